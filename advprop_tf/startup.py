"""A command's console starts with our lines: TensorFlow's C++ start-up notices are held back.

TensorFlow 2.21 logs through absl before anything initializes absl's logging, so its INFO
notices at import ("oneDNN custom operations are on", "This TensorFlow binary is optimized",
each shared library's "All log messages before absl::InitializeLog() is called are written to
STDERR") reach stderr whatever TF_CPP_MIN_LOG_LEVEL says. The command-line entry points call
`import_tensorflow_quietly()` before anything imports TensorFlow: it sets TF_CPP_MIN_LOG_LEVEL=2
(warnings and errors only) and imports TensorFlow with stderr captured, then passes on every
captured line but those INFO notices, so warnings and errors still show. A user who set
TF_CPP_MIN_LOG_LEVEL chose their verbosity: then nothing is held back.
"""

from __future__ import annotations

import os
import sys
import tempfile

ABSL_PRE_INIT_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def _is_startup_notice(line: str) -> bool:
    """absl's pre-init notice, and C++ INFO lines ("I" + the month and day, or 0000 before init)."""
    return line.startswith(ABSL_PRE_INIT_NOTICE) or (len(line) > 5 and line[0] == "I" and line[1:5].isdigit())


def import_tensorflow_quietly() -> None:
    if "tensorflow" in sys.modules:  # imported already (a test process, a library user): nothing to hold back
        return
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        import tensorflow  # noqa: F401
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not _is_startup_notice(line)))
            sys.stderr.flush()
