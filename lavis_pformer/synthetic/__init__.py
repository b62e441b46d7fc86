"""Synthetic data generated from a seed (nothing downloaded): the shapes world of images, captions and
questions, and the video world of clip features; used by the tiny backbones, the tests and the demo."""
