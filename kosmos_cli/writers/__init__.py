"""Results → files: the -o folder (atomic writes, resume, assembly), document formats, overlays.

Output layout under ``-o OUT`` (``<stem>`` is the document's relative stem from
`kosmos_cli.inputs`, e.g. ``invoice`` or ``2024/03/invoice`` — subfolders are mirrored)::

    OUT/
    ├── <stem>.md                        md:     the selected pages' markdown, "<!-- page N -->" before each
    ├── <stem>.txt                       ocr:    "x0,y0,x1,y0,x1,y1,x0,y1,text" lines
    │                                    ground: the caption
    ├── <stem>.json                      ocr, ground: {"source", "task", "model", "pages": [page objects]}
    ├── <stem>.pdf                       ocr with --outputs: the searchable PDF (writers.pdf)
    ├── <stem>.hocr, <stem>.alto.xml     ocr with --outputs: hOCR 1.2 and ALTO 4.4 (writers.hocr, writers.alto)
    ├── <stem>.overlay-0003.png          --overlay: page 3, OCR polygons / labelled grounding boxes coloured by confidence
    ├── <task>.review.tsv                --review-below P: the run's pages below P (kosmos_cli.review)
    └── .kosmos/<task>/<stem>/0003.json  resume state: finished page 3, one page object (JSONL schema)

In ``.txt`` files pages are separated by a form-feed line (``"\\f\\n"``, as pdftotext does); polygons
are in each page's own pixels. A single-page selection (``pages == [1]``) gets no ``<!-- page -->``
comment. ``ocr`` and ``ground`` both write ``.txt``/``.json``: give them different OUT folders.

A page that failed keeps its place in the document: ``.md`` gets ``<!-- page N: error: reason -->``
instead of its text, ``.txt`` an empty page section (the form feeds stay aligned with the pages),
``.json`` the page object with ``"error"`` set (`OutputDir.failed_pages` lists such pages), ``.hocr``
and ``.alto.xml`` an empty page element, ``.pdf`` its page without a text layer.

Names always fit the file system: a component longer than NAME_MAX (255 bytes, counted in the
file-system encoding) cannot be created. When a stem's last component plus the longest suffix
(``.overlay-NNNN.png``, 17 bytes) would not fit, it is cut at a character boundary and ``~`` plus 8
hex digits of the SHA-1 of the whole component are appended; every file of the document (and its
state folder) uses that one shortened name, which is the same in every run (only an overlay of page
10000 or later, with a longer suffix, may be cut further). Names that fit are used as they are.

Every text written (``.md``, ``.txt``, ``.json``, ``.hocr``, ``.alto.xml``, page files) is valid UTF-8: a result's ``source``
is `display_path` text (an undecodable byte of a file name as ``\\xHH``), and any other string with
lone surrogates has them written out as ``\\udcXX``.

Resume, in four rules:
1. Every finished page is stored at once, atomically, as ``.kosmos/<task>/<stem>/NNNN.json``. A
   failed page is stored too, with ``"error"`` set, so its document can still be assembled (with a
   placeholder), but it does not count as done.
2. After storing a page, `OutputDir.assemble` (re)writes the document's files, atomically, if and only
   if every page selected for the document in this run has a page file. The files hold exactly those
   pages, in page order (the command's selection, not whatever earlier runs left behind).
3. A re-run skips pages that are done (`OutputDir.is_done`: page file present, no error, same model),
   unless ``overwrite``; skipped pages are still read back when the document is assembled.
4. Every file is replaced atomically (temp file in the same folder, fsync, ``os.replace``), so a crash
   leaves the old or the new version of a file, never a torn one; a document file that lags its page
   files is rebuilt by the next run. Deleting OUT (or ``.kosmos``) starts from scratch.
The state folder is hidden so that ``ls OUT`` shows results and directory inputs skip it.

A file whose content would not change is left untouched (same inode and mtime): a re-run of a
finished command writes nothing, and make or rsync see nothing new.
A page file that cannot be read back (torn, not a page object) is reported through ``warn``, once,
and counts as missing: the page is redone.
A file that cannot be written raises `OutputError`, which names it and says why; so does a document
file that cannot be made from its input (a PDF pdfium no longer opens), after the document's other
files. A searchable PDF whose input pikepdf cannot rebuild is made from page images instead, and ``warn``
is told so.
"""
