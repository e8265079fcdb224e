"""The runs of rev_det's entry points: Detectron2's training and evaluation with rev_det's extras.

``projects/train_net.py`` (yacs) and ``projects/lazyconfig_train_net.py`` (LazyConfig) only parse
the command line and ``launch`` the workers; everything else is here, so that each of rev_det's
additions to Detectron2's training is wired in one place for both config systems. What differs
between them (where a setting lives, how it is spelled in messages) is passed in.

* Loading: :func:`load_yacs_config` and :func:`load_lazy_config`, with rev_det's checks of the
  command line and the config (:mod:`rev_det.checks`).
* The run's output directory: :func:`output_dir_run` holds it (no two runs mix their files),
  sets Detectron2 up, sends rev_det's log lines to ``log.txt`` and generates the datasets.
* The trainer: :class:`Trainer` (yacs, a DefaultTrainer) and :func:`train_lazy` build the model
  with named reversible blocks, check the dataset against the classifier
  (:func:`check_train_classes`) and the DDP wrapping, train with
  :class:`~rev_det.training.RevAMPTrainer` under AMP, checkpoint atomically with optional strict
  loading, add the iteration seeder, the coupling schedule and the reconstruction check
  (:func:`with_rev_det_hooks`),
  resume the data order (:func:`resume_data_at`) and explain a diverged run.
* Evaluation: :func:`load_weights` for ``--eval-only``.
* A whole run: :meth:`Trainer.run` and :func:`run_lazy`.
"""

import contextlib
import logging
import os
import weakref
from typing import Callable, Iterable, Iterator, List, Optional, Sequence

import detectron2.utils.comm as comm
import torch
from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.data import DatasetMapper, build_detection_test_loader
from detectron2.engine import (
    DefaultTrainer,
    HookBase,
    SimpleTrainer,
    default_setup,
    default_writers,
    hooks,
)
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import (
    COCOEvaluator,
    inference_on_dataset,
    print_csv_format,
    verify_results,
)
from detectron2.utils.logger import setup_logger
from torch import nn

from .checkpoint import AtomicCheckpointer, IterationSeeder
from .checks import (
    LAZY,
    YACS,
    CheckedMapper,
    OutputDirLock,
    SettingNames,
    check_lazy_config,
    check_lazy_overrides,
    check_no_flags_in_overrides,
    check_num_classes,
    check_yacs_config,
    complete_lazy_config,
    divergence_advice,
)
from .config import add_revdet_config
from .data import (
    ResumableTrainLoader,
    build_resumable_train_loader,
    prepare_datasets,
    register_coco_datasets,
)
from .modeling import build_detector, recompute_heads
from .reversible import name_reversible_blocks
from .reversible.ddp import check_ddp_model
from .solver import build_optimizer
from .step_in_backward import attach_ddp, check_step_in_backward, step_in_backward
from .training import CouplingSchedule, ReconstructionCheck, RevAMPTrainer, parse_precision
from .utils import detectron2_has_compiled_ops

__all__ = [
    "Trainer",
    "check_train_classes",
    "lazy_dataset_names",
    "load_lazy_config",
    "load_weights",
    "load_yacs_config",
    "output_dir_run",
    "resume_data_at",
    "run_lazy",
    "evaluate_lazy",
    "train_lazy",
    "with_rev_det_hooks",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- the shared wiring


@contextlib.contextmanager
def output_dir_run(
    cfg, args, output_dir: str, names: SettingNames, datasets: Iterable[str]
) -> Iterator[None]:
    """Hold ``output_dir`` for this run and set it up: the body is the training or evaluation.

    The lock is taken before Detectron2's ``default_setup`` writes the config and the log there,
    so a second run into the same directory stops before it touches a file.

    Args:
        cfg: the loaded config (either system), for ``default_setup``.
        args: the parsed command line, for ``default_setup``.
        output_dir: the run's output directory.
        names: how the config system spells its settings (:data:`~rev_det.checks.YACS` or
            :data:`~rev_det.checks.LAZY`), for messages.
        datasets: the names of the datasets the run reads; embedded ones are generated.
    """
    with OutputDirLock(output_dir, names.output_dir, enabled=comm.is_main_process()) as lock:
        default_setup(cfg, args)
        # Detectron2 sets up its own loggers only; rev_det's lines belong in log.txt too.
        setup_logger(output_dir, distributed_rank=comm.get_rank(), name="rev_det")
        lock.tidy()
        prepare_datasets(datasets)
        yield


def check_train_classes(
    data_loader, dataset_names: Sequence[str], num_classes: Optional[int], names: SettingNames
) -> None:
    """Raise if the training datasets have more categories than the classifier has classes.

    Call it once the loader is built: a rev_det loader has read the dataset dicts by then and
    summarised their annotations (other loaders have no summary; the datasets' metadata is
    used).
    """
    summary = getattr(data_loader, "annotation_summary", None)
    check_num_classes(summary, dataset_names, num_classes, names)


def with_rev_det_hooks(
    trainer_hooks: Sequence[Optional[HookBase]],
    seed: int,
    check: ReconstructionCheck,
    coupling: CouplingSchedule,
) -> List[Optional[HookBase]]:
    """Detectron2's training hooks with rev_det's added where they must run.

    * :class:`~rev_det.checkpoint.IterationSeeder` first (with ``seed >= 0``), so that every
      other hook's ``before_step`` already draws from the iteration's seed;
    * the coupling schedule next, so that the iteration's forward (and any evaluation after it)
      sees the iteration's coefficients;
    * the reconstruction check just before the ``PeriodicWriter``, which then writes its
      numbers, and after the evaluation on every process (the main one alone has a writer),
      so that all processes meet the check's and the evaluation's collectives in one order.

    Args:
        trainer_hooks: the hooks in Detectron2's order; ``None`` entries are kept (Detectron2's
            ``register_hooks`` skips them).
        seed: the config's seed; negative: no seeder.
        check: the reconstruction check (it does nothing with period 0).
        coupling: the coupling schedule (it does nothing without scaled couplings).
    """
    ordered = list(trainer_hooks)
    writers = [i for i, hook in enumerate(ordered) if isinstance(hook, hooks.PeriodicWriter)]
    ordered.insert(writers[0] if writers else len(ordered), check)
    return ([IterationSeeder(seed)] if seed >= 0 else []) + [coupling] + ordered


def resume_data_at(data_loader, start_iter: int, loader_setting: str) -> None:
    """Start a resumable training loader at ``start_iter`` (the batches of an uninterrupted run).

    Another loader cannot start there: a resumed run (``start_iter > 0``) logs that its data
    order starts anew.

    Args:
        data_loader: the training loader.
        start_iter: the first iteration of this run.
        loader_setting: where the loader comes from, for the message.
    """
    if isinstance(data_loader, ResumableTrainLoader):
        data_loader.start_iter = start_iter
    elif start_iter:
        logger.warning(
            "%s is not rev_det.data.build_resumable_train_loader: the resumed run starts the "
            "data order anew and differs from an uninterrupted run.",
            loader_setting,
        )


def load_weights(
    model: nn.Module, output_dir: str, weights: str, *, strict_load: bool, resume: bool
) -> nn.Module:
    """Load ``weights`` into ``model`` for evaluation (with ``resume``: the last checkpoint in
    ``output_dir`` if there is one), strictly with ``strict_load``. Returns ``model``."""
    checkpointer = AtomicCheckpointer(model, output_dir, strict_load=strict_load)
    checkpointer.resume_or_load(weights, resume=resume)
    return model


# -------------------------------------------------------------------------------------------- yacs


def load_yacs_config(args, extra_config: Sequence[Callable[[CfgNode], None]] = ()) -> CfgNode:
    """The checked, frozen yacs config of the command line ``args``.

    Args:
        args: Detectron2's parsed arguments (``config_file``, ``opts``).
        extra_config: functions adding a project's keys (e.g. PointRend's
            ``add_pointrend_config``), called before rev_det's keys and the file are added.
    """
    cfg = get_cfg()
    for add_config in extra_config:
        add_config(cfg)
    add_revdet_config(cfg)
    check_no_flags_in_overrides(args.opts)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    check_yacs_config(cfg)
    register_coco_datasets(cfg.DATASETS.COCO_INSTANCES, "DATASETS.COCO_INSTANCES")
    return cfg


class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer with rev_det's optimizer, a COCO evaluator, atomic
    checkpoints, and resumes that continue exactly as the uninterrupted run (with SEED >= 0).

    A project subclasses it as Detectron2's; :meth:`run` evaluates or trains as the command line
    says.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        check_ddp_model(self.model)
        attach_ddp(self.optimizer, self.model)
        check_train_classes(
            self.data_loader, cfg.DATASETS.TRAIN, cfg.MODEL.ROI_HEADS.NUM_CLASSES, YACS
        )
        if cfg.SOLVER.AMP.ENABLED:
            # v0.6's AMPTrainer needs CUDA and float16; this one autocasts on the model's device
            # to SOLVER.AMP.PRECISION (float16 with a grad scaler, or bfloat16).
            inner = self._trainer
            self._trainer = RevAMPTrainer(cfg, inner.model, inner.data_loader, inner.optimizer)

    @classmethod
    def run(cls, cfg, args):
        """Evaluate (``--eval-only``) or train as ``args`` says, in ``cfg.OUTPUT_DIR``.

        Returns:
            The evaluation results (of the final evaluation when training).
        """
        datasets = cfg.DATASETS.TRAIN + cfg.DATASETS.TEST
        with output_dir_run(cfg, args, cfg.OUTPUT_DIR, YACS, datasets):
            if args.eval_only:
                model = cls.build_model(cfg)
                load_weights(
                    model,
                    cfg.OUTPUT_DIR,
                    cfg.MODEL.WEIGHTS,
                    strict_load=cfg.MODEL.REV.STRICT_LOAD,
                    resume=args.resume,
                )
                res = cls.test(cfg, model)
                if comm.is_main_process():
                    verify_results(cfg, res)
                return res
            trainer = cls(cfg)
            trainer.resume_or_load(resume=args.resume)
            return trainer.train()

    def train(self):
        with divergence_advice(self, YACS, self.cfg.SOLVER.BASE_LR):
            return super().train()

    def build_hooks(self):
        # DefaultTrainer builds a DetectionCheckpointer just before it calls this method, for
        # the checkpointing hook; replace it with one that saves atomically.
        self.checkpointer = AtomicCheckpointer(
            self.model,
            self.cfg.OUTPUT_DIR,
            strict_load=self.cfg.MODEL.REV.STRICT_LOAD,
            trainer=weakref.proxy(self),
        )
        return with_rev_det_hooks(
            super().build_hooks(),
            self.cfg.SEED,
            ReconstructionCheck(self.cfg),
            CouplingSchedule(self.cfg),
        )

    @classmethod
    def build_model(cls, cfg):
        # Errors of the reversible backward then name the block (e.g. backbone.net.blocks.3).
        model = name_reversible_blocks(build_detector(cfg))
        logger.info("Model:\n%s", model)  # as Detectron2's build_model does
        return model

    # Detectron2 v0.6's DefaultTrainer checkpoints its hooks but not its inner trainer, so a
    # resumed run restarted the optimizer (AdamW moments) and AMP grad scaler from scratch
    # (detectron2 issue #4110); later versions save it under "_trainer" as here.
    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("The checkpoint has no optimizer state: the optimizer starts afresh.")

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        resume_data_at(self.data_loader, self.start_iter, f"{type(self).__name__}'s train loader")

    @classmethod
    def build_train_loader(cls, cfg):
        return build_resumable_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        # Image files that cannot be read, or would be read wrongly, are named.
        mapper = CheckedMapper(DatasetMapper(cfg, False))
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        # The fast evaluator is C++; a pure-Python Detectron2 build uses pycocotools.
        return COCOEvaluator(
            dataset_name, output_dir=output_folder, use_fast_impl=detectron2_has_compiled_ops()
        )

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)


# -------------------------------------------------------------------------------------- LazyConfig


def load_lazy_config(args):
    """The checked LazyConfig of the command line ``args`` (``config_file``, ``opts``: ``a.b=c``
    overrides), with rev_det's ``train`` settings completed by their defaults."""
    check_no_flags_in_overrides(args.opts)
    cfg = LazyConfig.load(args.config_file)
    complete_lazy_config(cfg)
    check_lazy_overrides(cfg, args.opts)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    check_lazy_config(cfg)
    register_coco_datasets(cfg.train.coco_instances, "train.coco_instances")
    return cfg


def lazy_dataset_names(cfg, splits: Sequence[str] = ("train", "test")) -> List[str]:
    """The dataset names of ``cfg.dataloader``'s ``splits``."""
    names = []
    for split in splits:
        loader = cfg.dataloader.get(split)
        if loader is not None:
            dataset_names = loader.dataset.names
            names += [dataset_names] if isinstance(dataset_names, str) else list(dataset_names)
    return names


def evaluate_lazy(cfg, model: nn.Module) -> dict:
    """Evaluate ``model`` with ``cfg.dataloader.evaluator`` (no evaluator: no results)."""
    if "evaluator" not in cfg.dataloader:
        return {}
    cfg.dataloader.evaluator.output_dir = os.path.join(cfg.train.output_dir, "inference")
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    print_csv_format(results)
    return results


def train_lazy(cfg, resume: bool = False) -> None:
    """Train ``cfg`` (a LazyConfig); with ``resume``, from the last checkpoint of its output
    directory if there is one."""
    complete_lazy_config(cfg)  # for configs loaded elsewhere than load_lazy_config
    # Errors of the reversible backward then name the block (e.g. backbone.net.blocks.3).
    model = name_reversible_blocks(instantiate(cfg.model))
    if cfg.train.recompute_heads:
        recompute_heads(model)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    precision = cfg.train.amp.get("precision", "float16")
    if cfg.train.step_in_backward:
        fp16 = cfg.train.amp.enabled and parse_precision(precision) == torch.float16
        check_step_in_backward(optimizer, fp16, "train.step_in_backward")
        step_in_backward(optimizer, model)
    train_loader = instantiate(cfg.dataloader.train)
    roi_heads = cfg.model.get("roi_heads", {})
    check_train_classes(
        train_loader,
        lazy_dataset_names(cfg, ("train",)),
        roi_heads.get("num_classes", None),
        LAZY,
    )

    ddp = dict(cfg.train.ddp)
    # DDP takes one communication hook: with the step inside backward, the one that steps
    # after the all-reduce, compressing as train.ddp.fp16_compression says.
    compress = bool(cfg.train.step_in_backward and ddp.pop("fp16_compression", False))
    model = check_ddp_model(create_ddp_model(model, **ddp))
    attach_ddp(optimizer, model, fp16_compression=compress)
    if cfg.train.amp.enabled:
        # v0.6's AMPTrainer needs CUDA and float16; this one autocasts on the model's device.
        trainer = RevAMPTrainer(model, train_loader, optimizer, precision=precision)
    else:
        trainer = SimpleTrainer(model, train_loader, optimizer)
    checkpointer = AtomicCheckpointer(
        model,
        cfg.train.output_dir,
        strict_load=cfg.train.strict_load,
        trainer=trainer,
    )
    main_process = comm.is_main_process()
    trainer.register_hooks(
        with_rev_det_hooks(
            [
                hooks.IterationTimer(),
                hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
                (
                    hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
                    if main_process
                    else None
                ),
                hooks.EvalHook(cfg.train.eval_period, lambda: evaluate_lazy(cfg, model)),
                (
                    hooks.PeriodicWriter(
                        default_writers(cfg.train.output_dir, cfg.train.max_iter),
                        period=cfg.train.log_period,
                    )
                    if main_process
                    else None
                ),
            ],
            cfg.train.seed,
            ReconstructionCheck(**cfg.train.check_reconstruction),
            CouplingSchedule(
                max_iter=cfg.train.max_iter,
                keys=tuple(f"train.coupling.{k}" for k in ("alpha", "beta", "ramp")),
                **cfg.train.coupling,
            ),
        )
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    resume_data_at(train_loader, start_iter, "dataloader.train")
    with divergence_advice(trainer, LAZY, cfg.optimizer.get("lr", None)):
        trainer.train(start_iter, cfg.train.max_iter)


def run_lazy(cfg, args) -> Optional[dict]:
    """Evaluate (``--eval-only``) or train the LazyConfig ``cfg`` as ``args`` says, in
    ``cfg.train.output_dir``.

    Returns:
        The evaluation results with ``--eval-only``, else None.
    """
    output_dir = cfg.train.output_dir
    with output_dir_run(cfg, args, output_dir, LAZY, lazy_dataset_names(cfg)):
        if args.eval_only:
            model = instantiate(cfg.model)
            model.to(cfg.train.device)
            model = create_ddp_model(model)
            load_weights(
                model,
                output_dir,
                cfg.train.init_checkpoint,
                strict_load=cfg.train.strict_load,
                resume=args.resume,
            )
            return evaluate_lazy(cfg, model)
        train_lazy(cfg, resume=args.resume)
        return None
