"""Run `qlora-ray` and SIGKILL it at a chosen point of its row writes (a test helper).

    python tests/kill_driver.py KIND N -- run SPEC --results DIR ...

The driver writes rows through `qlora_ray.results_io.resolve(...)`'s filesystem; here that
filesystem is the real local one seen through pyarrow's `PyFileSystem`, with one change:
at the N-th event of KIND (counted in this process) the process kills itself with
SIGKILL, as `kill -9` or the kernel's OOM killer would, at exactly that point:

    run-half / samples-half       half of a row's (or samples') bytes in the staging file
    run-staged / samples-staged   the staging file complete, not yet renamed into place
    run-moved / samples-moved     just after the rename: the file is visible, nothing after ran
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillingHandler(pafs.FileSystemHandler):
    """The local filesystem, with a SIGKILL at the N-th event of one kind."""

    def __init__(self, kind: str, n: int):
        self.fs = pafs.LocalFileSystem()
        self.kind, self.n, self.seen = kind, n, 0

    def _event(self, kind: str) -> bool:
        if kind != self.kind:
            return False
        self.seen += 1
        return self.seen == self.n

    # -- the three places a row write can be cut
    def open_output_stream(self, path: str, metadata: Any) -> Any:
        name = path.rsplit("/", 1)[-1]
        if name.startswith("probe-"):  # the driver's check that the folder is writable
            return self.fs.open_output_stream(path)
        handler = self
        what = "samples" if "-samples-" in name else "run"  # results_io._write_atomic's staging name
        target = open(path, "wb")  # noqa: SIM115 - closed through PythonFile

        class Half:
            def write(self, data: bytes) -> int:
                if handler._event(f"{what}-half"):
                    target.write(bytes(data)[: len(data) // 2])
                    target.flush()
                    os.fsync(target.fileno())
                    _die()
                return target.write(data)

            def close(self) -> None:
                target.close()
                if handler._event(f"{what}-staged"):
                    _die()

            def __getattr__(self, name: str) -> Any:
                return getattr(target, name)

        return pa.PythonFile(Half(), mode="w")

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)
        what = "samples" if "/samples/" in dest else "run"
        if self._event(f"{what}-moved"):
            _die()

    # -- everything else is the local filesystem
    def get_type_name(self) -> str:
        return "killing-local"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the root")

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)

    def copy_file(self, src: str, dest: str) -> None:
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path: str) -> Any:
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        return self.fs.open_input_file(path)

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        return self.fs.open_append_stream(path)

    def equals(self, other: Any) -> bool:
        return self is other


def main() -> None:
    kind, n, sep, *argv = sys.argv[1:]
    assert sep == "--", __doc__
    from qlora_ray import results_io
    from qlora_ray.cli import main as cli

    fs = pafs.PyFileSystem(KillingHandler(kind, int(n)))
    real = results_io.resolve

    def resolve(where: str) -> tuple[pafs.FileSystem, str]:
        _, base = real(where)
        return fs, base

    results_io.resolve = resolve  # the driver's row writes go through `fs`
    sys.exit(cli(argv))


if __name__ == "__main__":
    main()
