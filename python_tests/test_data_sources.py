"""Omniglot data sources: the official folder layout and zips, torchvision's omniglot-py/, the
download (over file:// and a local HTTP server, no network), and bad input of every kind.

The official layout is written once per session from the shared .npz arrays (PNG files, mode
"1" like the official ones, alphabet folders from alphabets.tsv), so every test compares with
the .npz path bit for bit. Everything skips, saying why, when the arrays are not found. Each
test uses its own IMAML_CACHE, never ~/.cache.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import shutil
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import imaml_ext.data.cache as cache
import imaml_ext.data.download as dl
import imaml_ext.data.locate as locate
import imaml_ext.data.official as official_layout
import imaml_ext.data.omniglot as omni
from imaml_ext.data import (
    DownloadError,
    default_search_paths,
    download_omniglot,
    find_data_root,
    load_omniglot,
)

SETS = omni.SETS


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    """A throw-away IMAML_CACHE per test, and no IMAML_DATA from the caller's shell."""
    cache = tmp_path / "imaml_cache"
    monkeypatch.setenv(omni.CACHE_ENV, str(cache))
    monkeypatch.delenv(omni.DATA_ENV, raising=False)
    return cache


@pytest.fixture(scope="session")
def npz_root() -> Path:
    try:
        root = find_data_root()
    except FileNotFoundError as e:
        pytest.skip(f"the Omniglot .npz arrays (shared/data/omniglot) are needed to build the official layout: {e}")
    if not all((root / name).is_file() for name in omni.SOURCES) or not (root / "alphabets.tsv").is_file():
        pytest.skip(f"{root} is not the .npz layout with alphabets.tsv; these tests build the official layout from it")
    return root


@pytest.fixture(scope="session")
def npz_paper(npz_root):
    """Per set, the bool paper array with canonical bytes (the archives' True bytes are 255)."""
    out = {}
    for which in SETS:
        with np.load(npz_root / f"{which}.npz") as f:
            out[which] = f["images"].view(np.uint8) != 0
    return out


@pytest.fixture(scope="session")
def npz_gray105(npz_root) -> np.ndarray:
    return omni._load_uint8(npz_root, 105, None)


@pytest.fixture(scope="session")
def npz_cache(tmp_path_factory, npz_root) -> Path:
    """A cache holding the .npz path's own 28 px resize."""
    cache = tmp_path_factory.mktemp("npz_cache")
    load_omniglot(npz_root, cache_dir=cache)
    return cache


@pytest.fixture(scope="session")
def npz_images28(npz_root, npz_cache) -> torch.Tensor:
    return load_omniglot(npz_root, cache_dir=npz_cache)


def _alphabets(npz_root: Path):
    rows = [line.split("\t") for line in (npz_root / "alphabets.tsv").read_text().splitlines()[1:] if line.strip()]
    return {which: [(name, int(a), int(b)) for s, name, a, b in rows if f"images_{s}" == which] for which in SETS}


def _png(paper_image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(paper_image).save(buf, format="PNG")  # bool -> mode "1", like the official PNGs
    return buf.getvalue()


@pytest.fixture(scope="session")
def official(tmp_path_factory, npz_root, npz_paper):
    """``folders/images_{background,evaluation}/<Alphabet>/characterNN/XXXX_YY.png`` and the same
    files zipped as ``zips/images_*.zip`` (top-level folder ``images_*/``), with their md5s."""
    base = tmp_path_factory.mktemp("official")
    folders, zips = base / "folders", base / "zips"
    zips.mkdir()
    md5s = {}
    for which, alphabets in _alphabets(npz_root).items():
        first = official_layout._FIRST_ID[which]
        with zipfile.ZipFile(zips / f"{which}.zip", "w", zipfile.ZIP_STORED) as zf:  # PNGs are compressed already
            for alphabet, lo, hi in alphabets:
                for cid in range(lo, hi + 1):
                    rel = f"{which}/{alphabet}/character{cid - lo + 1:02d}"
                    (folders / rel).mkdir(parents=True)
                    for d in range(omni.NUM_DRAWERS):
                        data = _png(npz_paper[which][cid - first, d])
                        name = f"{rel}/{cid:04d}_{d + 1:02d}.png"
                        (folders / name).write_bytes(data)
                        zf.writestr(name, data)
        md5s[f"{which}.zip"] = hashlib.md5((zips / f"{which}.zip").read_bytes()).hexdigest()
    return SimpleNamespace(folders=folders, zips=zips, md5s=md5s, url=zips.as_uri())


def _linked_copy(official, dest: Path) -> Path:
    """A data folder whose images_background/ is a hard-linked copy of the official one (cheap,
    and safe to change if files are replaced, never written in place) and whose
    images_evaluation/ links to the original."""
    src = official.folders / "images_background"
    for dirpath, _, files in os.walk(src):
        out = dest / "images_background" / Path(dirpath).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(os.path.join(dirpath, name), out / name)
            except OSError:
                shutil.copyfile(os.path.join(dirpath, name), out / name)
    (dest / "images_evaluation").symlink_to(official.folders / "images_evaluation", target_is_directory=True)
    return dest


def _files(folder: Path):
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- reading the official layout


def test_folder_layout_equals_npz(official, npz_gray105, npz_images28, npz_cache, own_cache, monkeypatch):
    root = official.folders
    assert find_data_root(root) == root.resolve()
    src = omni._locate(root)
    assert src.layout == "official" and [p.name for p in src.parts] == list(SETS)

    # 105 px: PNGs decoded, checked against PIXEL_SHA256, cached bit-packed.
    assert np.array_equal(omni._load_official_uint8(src, 105, own_cache), npz_gray105)
    # 28 px: resized here from the decoded cache, independently of the .npz path's resize.
    images = load_omniglot(root)
    assert images.dtype == torch.float32 and torch.equal(images, npz_images28)

    names = _files(own_cache)
    assert not [n for n in names if n.endswith(".tmp")]
    assert cache.VERIFIED_MARKER in names
    for which in SETS:
        assert omni._decoded_cache_file(own_cache, which).name in names
    # The resized cache is named by content: the very file the .npz path writes.
    assert omni._cache_file(own_cache, 28).name in names and omni._cache_file(own_cache, 28).name in _files(npz_cache)

    # Verified and cached: neither decoding nor resizing runs again.
    monkeypatch.setattr(official_layout, "_decode_set", lambda *a: pytest.fail("decoded PNGs despite the cache"))
    monkeypatch.setattr(omni, "_resize", lambda paper, s: pytest.fail("resized despite the cache")
                        if s != 105 else np.where(paper, np.uint8(255), np.uint8(0)))
    assert torch.equal(load_omniglot(root), npz_images28)
    assert np.array_equal(omni._load_official_uint8(src, 105, own_cache), npz_gray105)


def test_zip_layout_equals_npz_and_shares_the_resized_cache(official, npz_gray105, npz_images28, npz_cache, own_cache,
                                                            monkeypatch):
    root = official.zips
    src = omni._locate(root)
    assert src.layout == "official" and [p.name for p in src.parts] == [f"{w}.zip" for w in SETS]
    # A cache already holding the .npz path's 28 px images: after checking the zips' pixels the
    # loader reads it instead of resizing.
    own_cache.mkdir()
    shutil.copy(omni._cache_file(npz_cache, 28), own_cache)
    resized = []
    real_resize = omni._resize
    monkeypatch.setattr(omni, "_resize", lambda paper, s: resized.append(s) or real_resize(paper, s))
    assert torch.equal(load_omniglot(root), npz_images28)
    assert resized == []
    monkeypatch.setattr(official_layout, "_decode_set", lambda *a: pytest.fail("decoded PNGs despite the cache"))
    assert np.array_equal(omni._load_official_uint8(src, 105, own_cache), npz_gray105)


def test_torchvision_folder_and_default_search(official, tmp_path, monkeypatch):
    tv = tmp_path / "torchvision_root" / "omniglot-py"
    tv.mkdir(parents=True)
    for which in SETS:
        (tv / f"{which}.zip").symlink_to(official.zips / f"{which}.zip")
    assert find_data_root(tv.parent) == tv.resolve()
    assert find_data_root(tv) == tv.resolve()
    # Default search: ./data/omniglot-py, as torchvision's Omniglot(root="data") leaves it.
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "omniglot-py").symlink_to(tv, target_is_directory=True)
    monkeypatch.chdir(work)
    assert find_data_root() == tv.resolve()
    # A folder with both layouts: the .npz pair wins; per set, a zip wins over its folder.
    both = tmp_path / "both"
    both.mkdir()
    (both / "images_background.zip").symlink_to(official.zips / "images_background.zip")
    for which in SETS:
        (both / which).symlink_to(official.folders / which, target_is_directory=True)
    assert [p.name for p in omni._locate(both).parts] == ["images_background.zip", "images_evaluation"]


# --------------------------------------------------------------------------- downloading


def test_download_file_url_into_default_dir(official, npz_gray105, npz_images28, npz_cache, own_cache, tmp_path,
                                            monkeypatch):
    # Nothing to find: an empty working folder, no shared data beside the repo, no IMAML_DATA.
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setattr(locate, "_repo_root", lambda: tmp_path / "elsewhere" / "repo")
    with pytest.raises(FileNotFoundError, match=r"Pass root=<folder> or set IMAML_DATA=.*pass download=True to"):
        load_omniglot()
    assert not own_cache.exists()

    monkeypatch.setattr(dl, "OFFICIAL_URL", official.url)
    monkeypatch.setattr(dl, "OFFICIAL_MD5", official.md5s)
    own_cache.mkdir()
    shutil.copy(omni._cache_file(npz_cache, 28), own_cache)  # skip the resize: tested above
    images = load_omniglot(download=True, progress=False)
    assert torch.equal(images, npz_images28)

    dest = own_cache / "data" / "omniglot"
    assert dest == omni.default_download_dir()
    assert _files(dest) == ["images_background.zip", "images_evaluation.zip"]  # no temporary files left
    for which in SETS:
        assert (dest / f"{which}.zip").read_bytes() == (official.zips / f"{which}.zip").read_bytes()
    # Later runs find it without download=True.
    assert dest.parent.resolve() in default_search_paths()
    assert find_data_root() == dest.resolve()
    # The zips' pixels were checked and cached while loading: the 105 px images equal the npz's.
    monkeypatch.setattr(official_layout, "_decode_set", lambda *a: pytest.fail("decoded PNGs despite the cache"))
    assert np.array_equal(omni._load_official_uint8(omni._locate(None), 105, own_cache), npz_gray105)


def test_download_goes_to_root_or_imaml_data(official, tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "OFFICIAL_URL", official.url)
    monkeypatch.setattr(dl, "OFFICIAL_MD5", official.md5s)
    loaded = []
    # The reading is tested above; here only where the files go and what gets read.
    monkeypatch.setattr(omni, "_load_official_uint8",
                        lambda src, s, c: loaded.append(src.folder) or np.zeros((1, 20, s, s), np.uint8))
    given = tmp_path / "given"
    load_omniglot(given, download=True, progress=False)
    assert _files(given) == ["images_background.zip", "images_evaluation.zip"]
    env = tmp_path / "from_env"
    monkeypatch.setenv(omni.DATA_ENV, str(env))
    load_omniglot(download=True, progress=False)
    assert _files(env) == ["images_background.zip", "images_evaluation.zip"]
    assert loaded == [given, env]
    with pytest.raises(TypeError, match=r"download must be a bool; got int 1"):
        load_omniglot(given, download=1)


def test_download_omniglot_progress_and_no_refetch(official, tmp_path, capsys):
    dest = tmp_path / "dest"
    assert download_omniglot(dest, base_url=official.url, md5s=official.md5s) == dest
    assert _files(dest) == ["images_background.zip", "images_evaluation.zip"]
    err = capsys.readouterr().err
    assert "images_background.zip" in err and "images_evaluation.zip" in err  # tqdm's bars
    # Good files are kept, not fetched again: an unreachable URL does not matter.
    stamp = [(dest / n).stat().st_mtime_ns for n in _files(dest)]
    download_omniglot(dest, base_url=(tmp_path / "nowhere").as_uri(), md5s=official.md5s, progress=False)
    assert [(dest / n).stat().st_mtime_ns for n in _files(dest)] == stamp
    assert capsys.readouterr().err == ""


def test_download_wrong_md5_leaves_nothing_and_keeps_good_files(official, tmp_path):
    bad = "0" * 32
    dest = tmp_path / "dest"
    url = f"{official.url}/images_background.zip"
    with pytest.raises(ValueError) as err:
        download_omniglot(dest, base_url=official.url, md5s={**official.md5s, "images_background.zip": bad},
                          progress=False)
    msg = str(err.value)
    assert url in msg and bad in msg and official.md5s["images_background.zip"] in msg
    assert _files(dest) == []  # neither the file nor a temporary one

    # A good background zip is kept when the evaluation zip fails its check...
    good = (official.zips / "images_background.zip").read_bytes()
    (dest / "images_background.zip").write_bytes(good)
    with pytest.raises(ValueError, match=r"images_evaluation\.zip has md5 [0-9a-f]{32}, expected 0{32}"):
        download_omniglot(dest, base_url=official.url, md5s={**official.md5s, "images_evaluation.zip": bad},
                          progress=False)
    assert _files(dest) == ["images_background.zip"]
    # ...and is never replaced by a download that fails its check.
    with pytest.raises(ValueError, match="md5"):
        download_omniglot(dest, base_url=official.url, md5s={**official.md5s, "images_background.zip": bad},
                          progress=False)
    assert _files(dest) == ["images_background.zip"]
    assert (dest / "images_background.zip").read_bytes() == good


def test_download_bad_md5s_argument(tmp_path):
    with pytest.raises(ValueError, match=r"md5s must map 'images_evaluation.zip' to a 32-digit hex md5; got None"):
        download_omniglot(tmp_path, md5s={"images_background.zip": "0" * 32})
    with pytest.raises(ValueError, match=r"md5s must map 'images_background.zip' .*; got 'abc'"):
        download_omniglot(tmp_path, md5s={"images_background.zip": "abc", "images_evaluation.zip": "0" * 32})
    assert _files(tmp_path) == []


def test_download_network_errors_say_where_to_put_the_data(official, tmp_path):
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError) as err:
        download_omniglot(dest, base_url=(tmp_path / "nowhere").as_uri(), md5s=official.md5s, progress=False)
    assert isinstance(err.value, OSError)
    msg = str(err.value)
    for part in ("nowhere/images_background.zip", str(dest), "images_background.zip and images_evaluation.zip",
                 "IMAML_DATA", dl.OFFICIAL_URL):
        assert part in msg
    assert _files(dest) == []


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves the generated zips; ``/short/...`` announces the full length but stops halfway."""

    zips: Path

    def do_GET(self):
        folder, _, name = self.path.rpartition("/")
        short = folder == "/short"
        path = self.zips / name
        if folder not in ("", "/short") or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if short else data)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(official):
    handler = type("Handler", (_Handler,), {"zips": official.zips})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_over_http_short_transfer_and_404(official, http_server, tmp_path):
    dest = tmp_path / "dest"
    download_omniglot(dest, base_url=http_server + "/", md5s=official.md5s, progress=False)
    assert _files(dest) == ["images_background.zip", "images_evaluation.zip"]

    short = tmp_path / "short"
    with pytest.raises(DownloadError, match=r"/short/images_background\.zip stopped after \d+ of \d+ bytes"):
        download_omniglot(short, base_url=http_server + "/short", md5s=official.md5s, progress=False)
    assert _files(short) == []
    with pytest.raises(DownloadError, match=r"Could not download http://.*/missing/images_background\.zip: Not Found"):
        download_omniglot(short, base_url=http_server + "/missing", md5s={k: "0" * 32 for k in official.md5s},
                          progress=False)
    assert _files(short) == []


# --------------------------------------------------------------------------- bad input


def test_truncated_or_damaged_zip(official, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    good = (official.zips / "images_background.zip").read_bytes()
    (root / "images_background.zip").write_bytes(good[: len(good) // 2])
    (root / "images_evaluation.zip").symlink_to(official.zips / "images_evaluation.zip")
    with pytest.raises(ValueError, match=r"images_background\.zip' is not a readable zip file .*truncated or damaged"):
        load_omniglot(root, cache=False)
    # Found but damaged: download=True does not replace it.
    with pytest.raises(ValueError, match="truncated or damaged"):
        load_omniglot(root, download=True, cache=False)
    assert (root / "images_background.zip").stat().st_size == len(good) // 2

    # One flipped byte inside the first image: the zip's CRC check fails on reading it.
    damaged = bytearray(good)
    damaged[200] ^= 0xFF
    (root / "images_background.zip").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"images_background\.zip"):
        load_omniglot(root, cache=False)


def _replace(path: Path, image) -> None:
    path.unlink()  # a hard link: never write through it into the shared original
    if isinstance(image, bytes):
        path.write_bytes(image)
    else:
        image.save(path)


def _missing(root):
    (root / "images_background/Arcadian/character01/0001_05.png").unlink()
    return r"1 of 19280 images missing: Arcadian/character01/0001_05\.png"


def _missing_character(root):
    shutil.rmtree(root / "images_background/Arcadian/character26")
    return r"20 of 19280 images missing: 0026_01\.png \(no image of character 0026\), 0026_02\.png"


def _duplicate(root):
    shutil.copyfile(root / "images_background/Arcadian/character01/0001_05.png",
                    root / "images_background/Arcadian/character02/0001_05.png")
    return (r"character 0001, drawer 05 appears twice: 'Arcadian/character01/0001_05\.png' and "
            r"'Arcadian/character02/0001_05\.png'")


def _extra_id(root):
    shutil.copyfile(root / "images_background/Arcadian/character01/0001_05.png",
                    root / "images_background/Arcadian/character01/0965_01.png")
    return r"'Arcadian/character01/0965_01\.png' has character id 965; images_background holds ids 1\.\.964"


def _bad_name(root):
    (root / "images_background/Arcadian/character01/notes.png").write_bytes(b"")
    return r"unexpected image 'Arcadian/character01/notes\.png'; expected <Alphabet>/characterNN/XXXX_YY\.png"


def _wrong_size(root):
    from PIL import Image

    _replace(root / "images_background/Arcadian/character01/0001_01.png", Image.new("1", (104, 105), 1))
    return r"'Arcadian/character01/0001_01\.png' is 104x105 pixels; expected 105x105"


def _gray(root):
    from PIL import Image

    img = Image.new("L", (105, 105), 255)
    img.putpixel((3, 4), 128)
    _replace(root / "images_background/Arcadian/character01/0001_01.png", img)
    return r"0001_01\.png' has gray levels other than 0 and 255"


def _not_png(root):
    _replace(root / "images_background/Arcadian/character01/0001_01.png", b"\x89PNG truncated")
    return r"cannot decode 'Arcadian/character01/0001_01\.png' as an image"


def _flipped_pixel(root):
    from PIL import Image

    path = root / "images_background/Arcadian/character03/0003_07.png"
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("L")) == 255
    pixels[50, 50] = ~pixels[50, 50]
    _replace(path, Image.fromarray(pixels))
    return (r"images_background': its decoded pixels have sha256 [0-9a-f]{64}, expected "
            + omni.PIXEL_SHA256["images_background"] + r": not the official Omniglot images")


@pytest.mark.parametrize("damage", [_missing, _missing_character, _duplicate, _extra_id, _bad_name, _wrong_size,
                                    _gray, _not_png, _flipped_pixel])
def test_bad_official_folder(official, tmp_path, own_cache, damage):
    root = _linked_copy(official, tmp_path / "root")
    pattern = damage(root)
    with pytest.raises(ValueError, match=pattern) as err:
        load_omniglot(root)
    assert str(root / "images_background") in str(err.value)  # names the folder
    # Nothing cached from bad data.
    assert not own_cache.exists() or not [p for p in own_cache.iterdir() if p.suffix in (".npz", ".npy", ".json", ".tmp")]


def test_zip_with_images_outside_its_top_folder(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for which in SETS:
        with zipfile.ZipFile(root / f"{which}.zip", "w") as zf:
            zf.writestr("background/Arcadian/character01/0001_01.png", b"")
    with pytest.raises(ValueError, match=r"unexpected entry 'background/Arcadian/character01/0001_01\.png'; "
                                         r"every image of the zip must be under its top-level folder images_background/"):
        load_omniglot(root, cache=False)


def _fake_npz(folder: Path, **arrays):
    folder.mkdir(parents=True, exist_ok=True)
    for name in omni.SOURCES:
        np.savez(folder / name, **arrays.get(name.split(".")[0], {}))
    return folder


@pytest.mark.parametrize("arrays, pattern", [
    ({"images_background": {"images": np.zeros((3, 20, 105, 105), bool)}},
     r"images_background\.npz': 'images' must be bool \[964, 20, 105, 105\]; got bool \[3, 20, 105, 105\]"),
    ({"images_background": {"images": np.zeros((964, 20, 5, 4), bool)}},
     r"must be bool \[964, 20, 105, 105\]; got bool \[964, 20, 5, 4\]"),
    ({"images_background": {"images": np.zeros((964, 20, 105), bool)}},
     r"must be bool \[964, 20, 105, 105\]; got bool \[964, 20, 105\]"),
    ({"images_background": {"images": np.zeros((3, 20, 105, 105), np.uint8)}},
     r"must be bool \[964, 20, 105, 105\]; got uint8 \[3, 20, 105, 105\]"),
    ({"images_background": {"pixels": np.zeros(3, bool)}},
     r"images_background\.npz' has no 'images' array; it holds \['pixels'\]"),
])
def test_npz_with_wrong_arrays(tmp_path, monkeypatch, arrays, pattern):
    folder = _fake_npz(tmp_path / "npz", **arrays)
    with pytest.raises(ValueError, match=r"has sha256 [0-9a-f]{64}, expected"):
        load_omniglot(folder, cache=False)  # the checksum catches them first...
    for name in omni.SOURCES:  # ...and without it (say, a future version) the shape check does
        monkeypatch.setitem(omni.SOURCES, name, omni._sha256(folder / name))
    with pytest.raises(ValueError, match=pattern):
        load_omniglot(folder, cache=False)


def test_not_found_message_mentions_all_layouts_and_download(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        find_data_root(tmp_path / "nothing")
    msg = str(err.value)
    for part in ("images_background.npz", "as folders or as .zip files", "omniglot-py", "download=True",
                 str(tmp_path / "nothing")):
        assert part in msg
    assert "--download" not in msg  # from Python, the Python spelling (the command line says --download)
