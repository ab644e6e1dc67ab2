from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
runtime = [
    "torch>=2.2,<2.15",
    "torchvision>=0.17,<0.30",
    "numpy>=1.24,<3",
    "opencv-python-headless>=4.8",
    "scikit-image>=0.21",
    "scipy>=1.10",
    "lpips>=0.1.4,<0.2",
    "tqdm>=4.64",
    "pyyaml>=6.0",
    "pydicom>=3.0",
    # pydicom pixel-data plugins: JPEG (libjpeg), JPEG-LS (libjpeg), JPEG 2000 (openjpeg), RLE
    "pylibjpeg>=2.0",
    "pylibjpeg-libjpeg>=2.1",
    "pylibjpeg-openjpeg>=2.3",
    "pylibjpeg-rle>=2.0",
    "matplotlib>=3.7",
    "monai>=1.4",
    "safetensors>=0.4",
]

setup(
    name="gl-lcm",
    version="0.1.0",
    description="Global-Local Latent Consistency Models for bone suppression in chest X-rays",
    long_description=(here / "README.md").read_text(encoding="utf-8") if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gl_lcm", "gl_lcm.*"]),
    python_requires=">=3.10",
    install_requires=runtime,
    extras_require={"test": ["pytest>=7.4", "diffusers>=0.27", "pytorch-msssim>=1.0", "pyjpegls>=1.2"]},
    entry_points={"console_scripts": ["gl-lcm=gl_lcm.cli:main"]},
)
