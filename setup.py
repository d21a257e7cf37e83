from setuptools import find_packages, setup

setup(
    name="starflow-diffusers",
    version="0.1.0",
    description="STARFlow-V and STARFlow normalizing flows as Hugging Face diffusers components",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["starflow_diffusers", "starflow_diffusers.*"]),
    # the bundled tiny model (starflow_diffusers.BUNDLED_MODEL), a complete pipeline folder
    package_data={"starflow_diffusers": ["bundled/*/*.json", "bundled/*/*/*.json", "bundled/*/*/*.safetensors"]},
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.13.0",
        "diffusers>=0.42.1",
        "transformers>=5.23.0",
        "accelerate>=1.15.0",
        "safetensors>=0.8.0",
        "peft>=0.21.2",
        "opencv-python-headless>=5.0.0.93",
        "imageio>=2.38.1",
        "imageio-ffmpeg>=0.8.1",
        "pyyaml",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        # torchao: the quantized-loading test (a CPU build that installs without touching torch)
        "test": ["pytest", "sentencepiece", "compel>=2.5.1", "torchao==0.18.0"],
        "train": ["tensorboard"],
    },
    entry_points={
        "console_scripts": [
            "starflow-convert=starflow_diffusers.conversion.__main__:main",
            "starflow-train=starflow_diffusers.training.train:main",
            "starflow-train-lora=starflow_diffusers.training.train_lora:main",
            "starflow-v=starflow_diffusers.cli:main",
        ]
    },
)
