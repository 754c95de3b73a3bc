"""Finding Omniglot on disk: ``root`` (or ``$IMAML_DATA``) names the folder, else the usual places are
searched, for any layout :mod:`imaml_ext.data.omniglot` reads (see :func:`find_data_root`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

from . import download as _download
from .cache import default_cache_dir

PathLike = Union[str, "os.PathLike[str]"]

#: The two archives and their sha256 (from the data's README).
SOURCES: Dict[str, str] = {
    "images_background.npz": "8bf84167413cd00beacdce3fe582f780ab538d8dbef043a6d688f2527bbce199",
    "images_evaluation.npz": "0b84c7ffd94c4841c0040e529c86a82eaaccb986d8eadad5673f7991b7475276",
}

#: The two sets of the official layout (folder names, and zip names without ``.zip``).
SETS: Tuple[str, str] = ("images_background", "images_evaluation")

DATA_ENV = "IMAML_DATA"

_LAYOUTS = (
    "images_background.npz and images_evaluation.npz, or images_background and images_evaluation "
    "as folders or as .zip files (the official layout)"
)


class _Source(NamedTuple):
    """Where one copy of Omniglot lives."""

    folder: Path
    layout: str  # "npz" or "official"
    parts: Tuple[Path, Path]  # background, evaluation: the .npz files, or the folders / zips


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _detect(folder: Path) -> Optional[_Source]:
    """The layout ``folder`` itself holds, if any: both .npz files win over the official layout
    (their sha256 check is cheaper); per set of the latter a zip wins over a folder (torchvision
    keeps both, and the zip is the file a download checked)."""
    if all((folder / name).is_file() for name in SOURCES):
        return _Source(folder, "npz", tuple(folder / name for name in SOURCES))
    parts = []
    for which in SETS:
        if (folder / f"{which}.zip").is_file():
            parts.append(folder / f"{which}.zip")
        elif (folder / which).is_dir():
            parts.append(folder / which)
        else:
            return None
    return _Source(folder, "official", tuple(parts))


def _source_in(candidate: Path) -> Optional[_Source]:
    """``candidate`` itself, ``candidate/omniglot`` or torchvision's ``candidate/omniglot-py``."""
    for folder in (candidate, candidate / "omniglot", candidate / "omniglot-py"):
        found = _detect(folder)
        if found is not None:
            return found
    return None


def default_download_dir() -> Path:
    """Where ``load_omniglot(download=True)`` puts the zips when neither ``root`` nor
    ``IMAML_DATA`` is given: ``default_cache_dir()/data/omniglot`` (searched by default)."""
    return default_cache_dir() / "data" / "omniglot"


def default_search_paths() -> List[Path]:
    """Where :func:`find_data_root` looks when neither ``root`` nor ``IMAML_DATA`` is given:
    ``./data``, ``../shared/data``, ``<repo>/../shared/data``, ``default_cache_dir()/data``."""
    paths = [Path("data"), Path("..") / "shared" / "data", _repo_root().parent / "shared" / "data",
             default_download_dir().parent]
    out: List[Path] = []
    for p in paths:
        p = p.resolve()
        if p not in out:
            out.append(p)
    return out


def _given_root(root: Optional[PathLike]) -> Optional[Tuple[str, Path]]:
    if root is not None:
        return (_download.spelled("root").split("<")[0].strip(), Path(root).expanduser())
    if os.environ.get(DATA_ENV):
        return (f"${DATA_ENV}", Path(os.environ[DATA_ENV]).expanduser())
    return None


def _locate(root: Optional[PathLike]) -> _Source:
    given = _given_root(root)
    if given is not None:
        how, path = given
        if path.is_file():  # else a download would try to make a folder there
            raise ValueError(f"{how} is {str(path)!r}, a file, not a folder: pass the folder that holds the "
                             f"Omniglot data (or its parent)")
        found = _source_in(path)
        if found is None:
            raise FileNotFoundError(
                f"Omniglot data not found: {how} is {str(path)!r}, but neither it nor "
                f"{str(path / 'omniglot')!r} nor {str(path / 'omniglot-py')!r} holds {_LAYOUTS}. "
                f"Pass {_download.spelled('download')} to download the official zips into {str(path)!r}."
            )
        return found

    searched = default_search_paths()
    for candidate in searched:
        found = _source_in(candidate / "omniglot") or _detect(candidate / "omniglot-py")
        if found is not None:
            return found
    places = ", ".join(repr(str(p / "omniglot")) for p in searched)
    raise FileNotFoundError(
        f"Omniglot data not found: no folder holding {_LAYOUTS} at {places} (nor omniglot-py/ "
        f"beside them). Pass {_download.spelled('root')} or set {DATA_ENV}=<folder> (the folder with the data, "
        f"or its parent holding omniglot/), or pass {_download.spelled('download')} "
        f"to download the official zips into {str(default_download_dir())!r}."
    )


def find_data_root(root: Optional[PathLike] = None) -> Path:
    """The folder holding Omniglot in any layout of this module's docstring.

    ``root`` (or else the ``IMAML_DATA`` environment variable) may name that folder or its
    parent (the folder holding ``omniglot/`` or torchvision's ``omniglot-py/``); when given it
    is the only place looked at. Otherwise ``./data``, ``../shared/data``,
    ``<repo>/../shared/data`` and ``default_cache_dir()/data`` (where downloads go) are
    searched for an ``omniglot`` (or ``omniglot-py``) folder. Raises ``FileNotFoundError``
    naming every place searched.
    """
    return _locate(root).folder.resolve()


__all__ = ["DATA_ENV", "SETS", "SOURCES", "default_download_dir", "default_search_paths", "find_data_root"]
