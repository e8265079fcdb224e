from setuptools import find_packages, setup

setup(
    name="rev_det",
    version="0.1.0",
    description="Reversible vision-transformer backbones for Detectron2 (RevViT, RevMViT)",
    packages=find_packages(include=["rev_det", "rev_det.*"]),
    # The shipped pretrained weights (rev_det.model_zoo: rev_det://...).
    package_data={"rev_det.model_zoo": ["weights/*.pth"]},
    python_requires=">=3.9",
    # Detectron2 is required too, but it has no wheel on the package index:
    # `make setup` (tools/build_detectron2.py) builds one, or install it from source.
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "fvcore",
        "pycocotools",
        "matplotlib",
        "tqdm",
        "Pillow",
        # Detectron2's Visualizer (prediction pictures) imports cv2; v0.6 does not require it.
        "opencv-python-headless",
    ],
    extras_require={
        "dev": ["pytest", "black", "isort"],
        # ONNX export of the backbones is tested against onnxruntime (tests/test_export.py).
        "test": ["onnx", "onnxruntime", "onnxscript"],
    },
)
