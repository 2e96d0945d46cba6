"""What only LocalDirectoryStore does, on real directories: nothing a request or a planted link names escapes the
root, writes are atomic under concurrency, files are readable by a web server in front of the volume, settings
are validated. The behaviour every store shares is in test_storage_stores.py."""

from __future__ import annotations

import functools
import os
import stat
import threading
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from turboflow.errors import InvalidRequestError
from turboflow.storage.local import LocalDirectoryStore
from turboflow.storage.stores import StorageConfigError, StorageUnavailableError


@pytest.fixture
def root(tmp_path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.png").write_bytes(b"secret")
    return path


def _upload(root: Path, key: str, body: bytes) -> Path:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return path


@pytest.mark.parametrize(
    "path,code",
    [
        ("/etc/passwd", "image_not_allowed"),  # absolute, outside the root
        ("{root}/../outside/secret.png", "invalid_image_reference"),
        ("{root}/uploads/acme/./x.png", "invalid_image_reference"),
        ("uploads/acme/x.png", "invalid_image_reference"),  # relative: not a file:// path
        ("{root}/uploads/acme/x\0.png", "invalid_image_reference"),
        ("{root}x/uploads/acme/x.png", "image_not_allowed"),  # a sibling whose name starts like the root
    ],
)
def test_image_paths_outside_the_root_are_refused(root, path, code):
    store = LocalDirectoryStore(root)
    with pytest.raises(InvalidRequestError) as e:
        store.read_image(None, path.format(root=root), "acme")
    assert e.value.code == code


def test_links_are_followed_only_where_the_tenant_may_read(root, outside):
    store = LocalDirectoryStore(root)
    _upload(root, "uploads/globex/private.png", b"private")
    _upload(root, "uploads/acme/own.png", b"own")
    links = root / "uploads/acme"
    (links / "to-outside.png").symlink_to(outside / "secret.png")
    (links / "to-globex.png").symlink_to(root / "uploads/globex/private.png")
    (links / "to-own.png").symlink_to(links / "own.png")
    (links / "dir-outside").symlink_to(outside)
    for name in ("to-outside.png", "to-globex.png", "dir-outside/secret.png"):
        with pytest.raises(InvalidRequestError) as e:
            store.read_image(None, f"{links}/{name}", "acme")
        assert e.value.code == "image_not_allowed", name
        assert "secret" not in e.value.message and "globex" not in e.value.message
    assert store.read_image(None, f"{links}/to-own.png", "acme") == b"own"


def test_a_root_reached_through_a_link_keeps_the_configured_paths(tmp_path):
    real = tmp_path / "volume"
    real.mkdir()
    (tmp_path / "mnt").symlink_to(real)
    store = LocalDirectoryStore(tmp_path / "mnt")
    _upload(real, "uploads/acme/a.png", b"a")
    assert store.read_image(None, f"{tmp_path}/mnt/uploads/acme/a.png", "acme") == b"a"
    assert store.uri("videos/acme/r.mp4") == (tmp_path / "mnt/videos/acme/r.mp4").as_uri()


def test_writes_never_follow_a_link_out_of_the_root(root, outside, tmp_path):
    store = LocalDirectoryStore(root)
    (root / "videos").mkdir()
    (root / "videos/acme").symlink_to(outside)
    src = tmp_path / "v.mp4"
    src.write_bytes(b"video")
    key = store.video_key("acme", "r1", None, "promo")
    with pytest.raises(StorageConfigError) as e:
        store.put_video(src, key, {})
    assert str(outside) not in e.value.message
    assert sorted(p.name for p in outside.iterdir()) == ["secret.png"]  # nothing created outside


def test_a_sidecar_linking_outside_reads_as_absent(root, outside, tmp_path):
    store = LocalDirectoryStore(root)
    key = store.video_key("acme", "r2", None)
    (outside / "r2.json").write_text('{"video": {"bytes": 5}}')
    _upload(root, key, b"12345")
    (root / key).with_suffix(".json").symlink_to(outside / "r2.json")
    assert store.find_completion(key) is None


@pytest.mark.parametrize("key", ["../x.mp4", "/etc/x.mp4", "videos//x.mp4", "videos/./x.mp4", "a\\..\\b.mp4"])
def test_keys_given_to_the_store_must_be_plain(root, key):
    store = LocalDirectoryStore(root)
    with pytest.raises(InvalidRequestError) as e:
        store.find_completion(key)
    assert e.value.code == "invalid_key"


def test_concurrent_writers_and_a_reader_only_ever_see_whole_files(root, tmp_path):
    """Two replicas publish the same request at once while a consumer reads: every read sees one whole payload,
    the last rename wins, and no temporary file is left behind."""
    store = LocalDirectoryStore(root)
    key = store.video_key("acme", "race-1", None)
    payloads = [bytes([n]) * (3 << 20) for n in (1, 2)]  # same size: a torn file would not show in the size
    sources = []
    for n, payload in enumerate(payloads):
        sources.append(tmp_path / f"src{n}.mp4")
        sources[-1].write_bytes(payload)
    rounds, errors, seen = 15, [], set()
    done = threading.Event()

    def writer(source: Path) -> None:
        try:
            for _ in range(rounds):
                store.put_video(source, key, {})
                store.put_completion(key, {"video": {"key": key, "bytes": 3 << 20}, "from": source.name})
        except BaseException as e:  # surfaced below
            errors.append(e)

    def reader() -> None:
        target = root / key
        while not done.is_set():
            if target.exists():
                seen.add(target.read_bytes())
            if store.find_completion(key) is not None:
                seen.add(b"completion")

    threads = [threading.Thread(target=writer, args=(s,)) for s in sources]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert not errors
    assert seen <= {*payloads, b"completion"} and seen & set(payloads)
    assert (root / key).read_bytes() in payloads
    assert store.find_completion(key)["from"] in ("src0.mp4", "src1.mp4")
    assert sorted(p.name for p in (root / key).parent.iterdir()) == ["race-1.json", "race-1.mp4"]


def test_published_files_are_world_readable_and_served_by_a_web_server(root, tmp_path):
    """With public_base_url (e.g. nginx in front of the volume) the URL is that server's; here a real one."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        store = LocalDirectoryStore(root, public_base_url=base)
        src = tmp_path / "v.mp4"
        src.write_bytes(b"served")
        key = store.video_key("acme", "web-1", None)
        store.put_video(src, key, {})
        assert stat.S_IMODE(os.stat(root / key).st_mode) == 0o644
        url, _ = store.presign(key)
        assert url == base + key
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.read() == b"served"
    finally:
        server.shutdown()
        server.server_close()


def test_a_directory_where_the_video_belongs_is_a_typed_error_without_paths(root, tmp_path):
    store = LocalDirectoryStore(root)
    key = store.video_key("acme", "blocked", None)
    (root / key).mkdir(parents=True)  # something else occupies the name
    src = tmp_path / "v.mp4"
    src.write_bytes(b"x")
    with pytest.raises(StorageUnavailableError) as e:
        store.put_video(src, key, {})
    assert e.value.retryable and str(root) not in e.value.message
    assert [p.name for p in (root / key).parent.iterdir()] == ["blocked.mp4"]  # the temporary file is gone


@pytest.mark.parametrize(
    "kwargs",
    [
        {"output_prefix": "../videos"},
        {"image_prefix": "up/../x"},
        {"shared_image_prefixes": ("a/../b/",)},
        {"shared_image_prefixes": ("",)},
        {"max_image_bytes": 0},
    ],
)
def test_bad_settings_are_configuration_errors(root, kwargs):
    with pytest.raises(StorageConfigError):
        LocalDirectoryStore(root, **kwargs)


def test_a_missing_directory_is_not_created(tmp_path):
    """An unmounted volume must not silently turn into a local folder."""
    with pytest.raises(StorageConfigError):
        LocalDirectoryStore(tmp_path / "not-mounted")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageConfigError):
        LocalDirectoryStore(tmp_path / "file")
    assert not (tmp_path / "not-mounted").exists()
