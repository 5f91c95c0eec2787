"""Compatibility layers: other APIs over divekit's own implementation.

``from divekit.compat import d2l`` gives the names of the *Dive into Deep Learning* book's
``d2l.torch`` module, with the book's signatures, as thin adapters over divekit.
"""
