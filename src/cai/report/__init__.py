"""The audit report: one self-contained HTML page for a run directory.

``build_report(run_dir)`` reads whatever stages the run has (a run with only
``prepare`` and ``critique_revision`` still gets a page) and returns the HTML: CSS and
JavaScript inline, every plot a base64 PNG data URI, so the file opens from disk with no
server and can be mailed or archived as it is.

Model text is hostile data, and the page is built so that it can never run:

* text that Python puts in the page goes through ``html.escape``;
* the chains and comparisons the browsers show travel as JSON inside
  ``<script type="application/json">``, with ``<``, ``>``, ``&``, U+2028 and U+2029
  written as ``\\uXXXX`` escapes (so no ``</script>`` or ``<!--`` can appear in it), and
  the JavaScript renders them with ``textContent`` only, never ``innerHTML``;
* a Content-Security-Policy allows only this page's own two scripts (by nonce), inline
  styles and ``data:`` images: no network, no event-handler attributes. This is a second
  wall; the escaping above is the first, and the tests check both.

CLI: ``cai report RUN_DIR [--out FILE] [--screenshot PNG]``; the ``report`` stage writes
``RUN_DIR/report/index.html`` at the end of ``cai run``.
"""

from __future__ import annotations

from cai.report.build import build_report, safe_json, write_report

__all__ = ["build_report", "safe_json", "write_report"]
