"""Run a trained rev_det detector on your own images or video: pictures with the detections
drawn and a COCO-format results file.

Detectron2's ``demo/demo.py`` flags, for yacs and LazyConfig files alike::

    python -m rev_det.predict --config-file configs/demo/mask_rcnn_rev_vit_demo.yaml \\
        --input my_photo.jpg more/*.png a_folder/ --output predictions/ \\
        --opts MODEL.WEIGHTS output/demo/model_final.pth
    python -m rev_det.predict --config-file configs/COCO/mask_rcnn_rev_vit_b_100ep.py \\
        --input images/ --output out/ --opts train.init_checkpoint=model_final.pth

``--output`` is a folder: one picture per input (its name, ``.jpg``/``.png`` kept) and
``results.json`` (Detectron2's ``instances_to_coco_json``: ``bbox`` in XYWH, ``segmentation``
as RLE, ``category_id`` the contiguous class index, plus ``file_name``). Without ``--output`` the
detections are printed. Class names come from the config's first test dataset's metadata. An
input that cannot be read is reported and skipped; the others are still processed, and the
exit status is 1 if any failed.
"""

import argparse
import glob
import itertools
import json
import logging
import os
import sys
from typing import List, Optional, Sequence

import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

from .checkpoint import AtomicCheckpointer, listed_keys
from .runs import Trainer, load_lazy_config, load_yacs_config

__all__ = ["Predictor", "collect_inputs", "main"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def collect_inputs(inputs: Sequence[str]) -> List[str]:
    """The image files that ``inputs`` (files, globs, folders) name, in order, without repeats.

    Raises:
        FileNotFoundError: an input that matches nothing, or a folder with no images.
    """
    files: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, f)
                for f in os.listdir(item)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                raise FileNotFoundError(
                    f"--input {item}: the folder has no images ({', '.join(IMAGE_EXTENSIONS)})."
                )
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(glob.glob(os.path.expanduser(item)))
            if not found:
                raise FileNotFoundError(f"--input {item}: no such file, folder or glob match.")
        files += [f for f in found if f not in files]
    return files


class Predictor:
    """A detector of a yacs or LazyConfig file with its trained weights, on single images.

    Args:
        config_file: a ``.yaml`` (yacs) or ``.py`` (LazyConfig) file.
        opts: overrides (yacs ``KEY VALUE`` pairs, LazyConfig ``a.b=c``); the weights are
            ``MODEL.WEIGHTS`` / ``train.init_checkpoint``.
        device: "cpu" or "cuda"; None: the config's.
    """

    def __init__(self, config_file: str, opts: Sequence[str] = (), device: Optional[str] = None):
        args = argparse.Namespace(config_file=config_file, opts=list(opts))
        if config_file.endswith(".py"):
            cfg = load_lazy_config(args)
            if device:
                cfg.train.device = device
            self.model = instantiate(cfg.model).to(cfg.train.device)
            weights, key = cfg.train.init_checkpoint, "train.init_checkpoint"
            mapper = cfg.dataloader.test.mapper
            self.augmentations = T.AugmentationList([instantiate(a) for a in mapper.augmentations])
            self.format = mapper.image_format
            datasets = cfg.dataloader.test.dataset.names
            self.dataset = datasets if isinstance(datasets, str) else datasets[0]
        else:
            cfg = load_yacs_config(args)
            if device:
                cfg.defrost()
                cfg.MODEL.DEVICE = device
            self.model = Trainer.build_model(cfg)
            weights, key = cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS"
            self.augmentations = T.AugmentationList(
                [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
            )
            self.format = cfg.INPUT.FORMAT
            self.dataset = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
        self.model.eval()
        self._load(weights, key)
        metadata = MetadataCatalog.get(self.dataset) if self.dataset else None
        self.metadata = metadata
        self.class_names = list(metadata.get("thing_classes", [])) if metadata else []

    def _load(self, weights: str, key: str) -> None:
        if not weights:
            raise ValueError(
                f"No weights to predict with: set {key} to the trained model's checkpoint "
                f"(e.g. --opts {key} output/model_final.pth, LazyConfig: {key}=...)."
            )
        checkpointer = AtomicCheckpointer(self.model)
        checkpointer.load(weights)
        missing = checkpointer.missing_weights
        if missing:
            raise ValueError(
                f"{key} = {weights} lacks {len(missing)} of this model's weights, or has them in "
                f"another shape ({listed_keys(missing, 5)}): it is not a checkpoint of this config's model. Give "
                "the model_final.pth (or model_*.pth) trained with this config."
            )

    def __call__(self, image: np.ndarray) -> dict:
        """Detections on one image (H, W, C in the config's input format)."""
        height, width = image.shape[:2]
        aug = T.AugInput(image)
        self.augmentations(aug)
        tensor = torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1)))
        with torch.no_grad():
            return self.model([{"image": tensor, "height": height, "width": width}])[0]

    def draw(self, image: np.ndarray, instances) -> np.ndarray:
        """``image`` (RGB) with ``instances`` drawn, as Detectron2's Visualizer draws them."""
        visualizer = Visualizer(image, self.metadata)
        return visualizer.draw_instance_predictions(instances).get_image()


def _rgb(image: np.ndarray, fmt: str) -> np.ndarray:
    """The RGB picture of an image read in ``fmt``."""
    if fmt == "BGR":
        return image[:, :, ::-1]
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return image


def _save(path: str, rgb: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(rgb)).save(path)


def predict_images(predictor: Predictor, files: List[str], output: Optional[str], threshold):
    """Detections of each file (drawn into ``output`` if given); the failures, by file."""
    from tqdm import tqdm

    results, failed = [], {}
    for image_id, path in enumerate(tqdm(files, desc="images", unit="image")):
        try:
            image = read_image(path, format=predictor.format)
        except Exception as error:  # an unreadable file must not stop the others
            failed[path] = f"cannot read it as an image ({type(error).__name__}: {error})"
            continue
        instances = predictor(image)["instances"].to("cpu")
        instances = instances[instances.scores >= threshold]
        for result in instances_to_coco_json(instances, image_id):
            results.append(dict(result, file_name=path))
        if output:
            name = os.path.basename(path)
            stem, ext = os.path.splitext(name)
            drawn = predictor.draw(_rgb(image, predictor.format), instances)
            _save(os.path.join(output, stem + (ext if ext.lower() == ".png" else ".jpg")), drawn)
        else:
            names = predictor.class_names
            labels = [
                names[c] if c < len(names) else str(c) for c in instances.pred_classes.tolist()
            ]
            print(f"{path}: {len(instances)} detections: {', '.join(labels) or '-'}")
    return results, failed


def predict_video(predictor: Predictor, path: str, output: Optional[str], threshold) -> int:
    """Draw the detections into every frame of the video ``path``; the number of frames."""
    import cv2
    from tqdm import tqdm

    video = cv2.VideoCapture(path)
    if not video.isOpened():
        raise FileNotFoundError(f"--video-input {path}: cannot open it as a video.")
    frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    writer, count = None, 0
    try:
        for _ in tqdm(range(frames) if frames else itertools.count(), desc="frames", unit="frame"):
            ok, frame = video.read()  # BGR
            if not ok:
                break
            image = frame if predictor.format == "BGR" else frame[:, :, ::-1]
            instances = predictor(np.ascontiguousarray(image))["instances"].to("cpu")
            drawn = predictor.draw(frame[:, :, ::-1], instances[instances.scores >= threshold])
            if output:
                if writer is None:
                    name = os.path.splitext(os.path.basename(path))[0] + ".mp4"
                    height, width = drawn.shape[:2]
                    fourcc = cv2.VideoWriter_fourcc(*"mp4v")
                    writer = cv2.VideoWriter(
                        os.path.join(output, name), fourcc, fps, (width, height)
                    )
                writer.write(np.ascontiguousarray(drawn[:, :, ::-1]))
            count += 1
    finally:
        video.release()
        if writer is not None:
            writer.release()
    return count


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="a .yaml or LazyConfig .py file")
    parser.add_argument("--input", nargs="+", help="image files, globs or folders")
    parser.add_argument("--video-input", help="a video file")
    parser.add_argument("--output", help="folder for the drawn pictures and results.json")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: the config's")
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="overrides: KEY VALUE pairs (yacs) or key=value (LazyConfig), e.g. MODEL.WEIGHTS",
    )
    args = parser.parse_args(argv)
    if bool(args.input) == bool(args.video_input):
        parser.error("give either --input (images) or --video-input (a video)")
    if not 0 <= args.confidence_threshold <= 1:
        parser.error("--confidence-threshold must be between 0 and 1")
    return args


def main(argv=None) -> int:
    """The command line; returns the exit status (1 if an input failed)."""
    args = parse_args(argv)
    setup_logger(name="rev_det")
    try:
        files = collect_inputs(args.input) if args.input else []
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    predictor = Predictor(args.config_file, args.opts, args.device)
    if args.output:
        os.makedirs(args.output, exist_ok=True)
    if args.video_input:
        frames = predict_video(predictor, args.video_input, args.output, args.confidence_threshold)
        print(f"{frames} frames" + (f" drawn into {args.output}" if args.output else ""))
        return 0
    results, failed = predict_images(predictor, files, args.output, args.confidence_threshold)
    if args.output:
        with open(os.path.join(args.output, "results.json"), "w") as f:
            json.dump(results, f)
        print(f"{len(files) - len(failed)} images, {len(results)} detections: {args.output}")
    for path, why in failed.items():
        print(f"error: {path}: {why}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
