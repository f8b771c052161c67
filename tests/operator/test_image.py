"""deploy/Dockerfile holds what the issue asks of the image (no container runtime in CI)."""

from __future__ import annotations

from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[2] / "deploy" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def test_image_is_slim_non_root_with_data_volume_and_every_listener() -> None:
    ins = instructions()
    assert ins[0][0] == "FROM" and "slim" in ins[0][1]
    assert ("USER", "1000:1000") in ins
    assert ("VOLUME", '["/data"]') in ins
    exposed = " ".join(rest for word, rest in ins if word == "EXPOSE").split()
    for port in ("1883/tcp", "8883/tcp", "8083/tcp", "8084/tcp", "14567/udp", "18083/tcp"):
        assert port in exposed
    assert ("ENTRYPOINT", '["roost"]') in ins and ("CMD", '["start"]') in ins
    env = " ".join(rest for word, rest in ins if word == "ENV")
    assert "ROOST_DATA_DIR=/data" in env
