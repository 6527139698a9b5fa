"""The triage page: look at the ranked outliers, read why each is odd, mark verdicts.

- :mod:`.verdicts`: the verdict store (``verdicts.parquet`` in a scored catalog folder),
  validated, written atomically under a lock.
- :mod:`.page`: the self-contained HTML page (inline JS/CSS/data, nothing fetched from the
  internet) built from a scored catalog folder; ``mendis score --html`` writes it as
  ``triage.html``, ``mendis serve --triage DIR`` serves it at ``/triage``.
"""
