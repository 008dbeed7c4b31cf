"""Test kits built on the public API: hostile card bytes for any reader.

:mod:`.mutations` turns a valid card into corrupted, truncated and forged
variants (one function per category) and classifies a reader's answer.
The core never imports this package.
"""
