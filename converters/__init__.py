"""Bridges between QKVShare and foreign formats (installed as ``qkvshare_converters``).

Everything that speaks another runtime's or file format's language lives here: GGUF
model import, Hugging Face models and caches, mlx-lm prompt-cache files. torch and
transformers are imported lazily, inside the functions that need them, so importing
this package (or the core ``qkvshare_mlx``) never pulls them in.
"""
