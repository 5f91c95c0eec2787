"""Run the book's sections headless: ``divekit book run SECTION.md``.

:mod:`divekit.book.sections` reads a section (the book's markdown or a notebook) into cells and
rewrites the ``d2l`` import (and, in quick mode, literal epoch counts); :mod:`divekit.book.runner`
runs the cells in an IPython kernel through nbclient and writes the report and the executed
notebook. The section's code imports :mod:`divekit.compat` inside the kernel; this package does
not import it.
"""
