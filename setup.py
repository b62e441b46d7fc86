from setuptools import find_packages, setup

setup(
    name="lavis-pformer",
    version="0.1.0",
    description="P-Former (decoupled language pre-training) for Salesforce LAVIS BLIP-2",
    packages=find_packages(include=["lavis_pformer", "lavis_pformer.*"]),
    # demo/backbones: the demo's frozen LM, ViT, starting BERT and T5 (make demo-backbones), about 10 MB;
    # demo/video_backbones: the video miniature's frozen LM (world seed 0), 2 MB
    package_data={"lavis_pformer": ["configs/**/*.yaml", "configs/*/*.yaml", "demo/backbones/*",
                                    "demo/backbones/*/*", "demo/video_backbones/*", "demo/video_backbones/*/*"]},
    python_requires=">=3.9",
    install_requires=[
        "salesforce-lavis==1.0.2",
        # LAVIS 1.0.2 imports on Python 3.11 only with these (opencv 4.5.5 is built against numpy 1).
        "numpy<2",
        "pandas<2.3",
        "scipy<1.15",
        "scikit-image<0.25",
        "transformers>=4.25,<4.27",
        "sentencepiece",
        # transformers 4.26's sentencepiece conversion (T5 without tokenizer.json) needs protobuf 3.
        "protobuf<4",
        "tokenizers",
        # annotation files: decoded by msgspec, cached as memory-mapped Arrow IPC files
        "msgspec>=0.18",
        "pyarrow>=12",
    ],
    extras_require={"test": ["pytest"]},
)
