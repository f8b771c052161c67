"""A real, container-less Kubernetes control plane for the test suite.

etcd (Debian's etcd-server), kube-apiserver, kube-controller-manager and kube-scheduler built from
the k8s.io/kubernetes Go module by hack/build-kube-testenv.sh, and kwok standing in for the kubelets
of three fake Nodes. Everything listens on 127.0.0.1 on free ports and lives in one temp directory.

Addresses: every process binds to 127.0.0.1, and the fake Nodes report 127.0.0.1 as their address,
so anything the API server dials for a node (logs, exec) stays on loopback and reaches kwok. Pod IPs
(POD_CIDR) and Service IPs (SERVICE_CIDR) are bookkeeping only: no container, kube-proxy or route
exists behind them, so nothing must ever connect to them (do not use pods/proxy or services/proxy).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-kube-testenv.sh"
VERSIONS_FILE = REPO_ROOT / "hack" / "kube-testenv.versions"
KWOK_STAGES = Path(__file__).resolve().parent / "kwok-stages.yaml"

NODE_NAMES = ("kwok-node-0", "kwok-node-1", "kwok-node-2")
NODE_ZONES = ("zone-a", "zone-b", "zone-c")
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"
FAKE_STORAGE_CLASS = "roost-fake"
NO_PROVISIONER_STORAGE_CLASS = "no-provisioner"
BUILD_TIMEOUT_S = 90 * 60
START_TIMEOUT_S = 120.0

T = TypeVar("T")


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or reached."""


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl run; its message carries kubectl's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr:\n{self.stderr}"


def read_versions() -> dict[str, str]:
    """The KEY=VALUE pairs of hack/kube-testenv.versions (the one place versions live)."""
    out: dict[str, str] = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def ensure_binaries(timeout: float = BUILD_TIMEOUT_S) -> Path:
    """Run the build script (seconds when the cache is warm) and return the bin directory."""
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise ControlPlaneError(
            f"{BUILD_SCRIPT.name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return Path(proc.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    check: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.25,
    alive: Callable[[], None] | None = None,
) -> T:
    """Poll ``check`` until it returns something truthy; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        if alive is not None:
            alive()
        try:
            result = check()
            if result:
                return result
        except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


# --- certificates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _cert(
    subject: x509.Name,
    public_key: Any,
    issuer: x509.Name,
    signing_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    usages: Sequence[x509.ObjectIdentifier] = (),
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=not ca,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    """A throwaway CA, the API server's serving cert, an admin client cert, and SA keys."""
    directory.mkdir(parents=True, exist_ok=True)

    def name(cn: str, org: str | None = None) -> x509.Name:
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        if org:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        return x509.Name(attrs)

    def pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("roost-test-ca")
    ca = _cert(ca_name, ca_key.public_key(), ca_name, ca_key, ca=True)

    server_key = ec.generate_private_key(ec.SECP256R1())
    first_service_ip = next(ipaddress.ip_network(SERVICE_CIDR).hosts())
    sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(first_service_ip),
        x509.DNSName("localhost"),
    ]
    for dns in ("", ".default", ".default.svc", ".default.svc.cluster.local"):
        sans.append(x509.DNSName("kubernetes" + dns))
    server = _cert(
        name("kube-apiserver"),
        server_key.public_key(),
        ca_name,
        ca_key,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        sans=sans,
    )

    admin_key = ec.generate_private_key(ec.SECP256R1())
    admin = _cert(
        name("roost-test-admin", "system:masters"),
        admin_key.public_key(),
        ca_name,
        ca_key,
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    pki = Pki(
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        server_cert=directory / "apiserver.crt",
        server_key=directory / "apiserver.key",
        admin_cert=directory / "admin.crt",
        admin_key=directory / "admin.key",
        sa_key=directory / "sa.key",
        sa_pub=directory / "sa.pub",
    )
    pki.ca_cert.write_bytes(pem(ca))
    _write_key(pki.ca_key, ca_key)
    pki.server_cert.write_bytes(pem(server))
    _write_key(pki.server_key, server_key)
    pki.admin_cert.write_bytes(pem(admin))
    _write_key(pki.admin_key, admin_key)
    _write_key(pki.sa_key, sa_key)
    pki.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pki


def write_kubeconfig(path: Path, server: str, pki: Pki) -> None:
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "roost-test",
                "cluster": {"server": server, "certificate-authority-data": b64(pki.ca_cert)},
            }
        ],
        "users": [
            {
                "name": "roost-test-admin",
                "user": {
                    "client-certificate-data": b64(pki.admin_cert),
                    "client-key-data": b64(pki.admin_key),
                },
            }
        ],
        "contexts": [
            {
                "name": "roost-test",
                "context": {"cluster": "roost-test", "user": "roost-test-admin"},
            }
        ],
        "current-context": "roost-test",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


# --- processes ------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: get SIGKILL if the test process dies without cleaning up (Linux only)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes]

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise ControlPlaneError(
                f"{self.name} exited with {code}; last lines of {self.log}:\n{self.tail()}"
            )


@dataclass
class ProcessSet:
    """Processes started in order and stopped in reverse order, each in its own process group."""

    log_dir: Path
    procs: list[ManagedProcess] = field(default_factory=list)

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> ManagedProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        proc = ManagedProcess(name, argv, log, popen)
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        for proc in self.procs:
            proc.check_alive()

    def stop_all(self, grace: float = 10.0) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(timeout=10)


# --- the cluster ----------------------------------------------------------------------------------


@dataclass
class KubeCluster:
    """What the ``kube`` fixture yields: where the cluster is and how to talk to it."""

    kubeconfig: Path
    server: str
    bin_dir: Path
    workdir: Path
    version: str
    node_names: tuple[str, ...] = NODE_NAMES
    processes: ProcessSet | None = None

    @property
    def kubectl_path(self) -> Path:
        return self.bin_dir / "kubectl"

    @property
    def env(self) -> dict[str, str]:
        """Environment for a subprocess (e.g. the operator) that should use this cluster."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl against this cluster. ``check`` raises with stderr on failure."""
        argv = [str(self.kubectl_path), "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, argv, output=proc.stdout, stderr=proc.stderr)
        return proc

    def get(self, *args: str) -> Any:
        """``kubectl get ... -o json``, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, manifest: str | dict[str, Any] | list[dict[str, Any]], *extra: str) -> str:
        """``kubectl apply -f -`` of YAML text, one object, or a list of objects."""
        if isinstance(manifest, dict):
            text = yaml.safe_dump(manifest)
        elif isinstance(manifest, list):
            text = yaml.safe_dump_all(manifest)
        else:
            text = manifest
        return self.kubectl("apply", "-f", "-", *extra, input=text).stdout

    def wait_for(
        self, check: Callable[[], T | None], timeout: float = 60.0, what: str = "condition"
    ) -> T:
        """Bounded poll; fails early with a log tail if a control-plane process has died."""
        alive = self.processes.check_alive if self.processes else None
        return wait_until(check, timeout, what, interval=0.5, alive=alive)


def _https_ok(url: str, context: ssl.SSLContext) -> bool:
    try:
        with urllib.request.urlopen(url, context=context, timeout=3) as resp:
            return bool(resp.status == 200)
    except urllib.error.HTTPError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return bool(resp.status == 200)
    except urllib.error.HTTPError:
        return False


def _node_manifest(name: str, zone: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {FAKE_NODE_ANNOTATION: "fake"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "topology.kubernetes.io/zone": zone,
                "type": "kwok",
            },
        },
    }


def _storage_classes() -> list[dict[str, Any]]:
    def sc(name: str, provisioner: str, default: bool) -> dict[str, Any]:
        annotations = {"storageclass.kubernetes.io/is-default-class": str(default).lower()}
        return {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": name, "annotations": annotations},
            "provisioner": provisioner,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
        }

    return [
        # Served by the roost-pvc-provision kwok stage: claims bind, pods schedule.
        sc(FAKE_STORAGE_CLASS, "roost.invalid/fake", default=True),
        # Served by nobody, as on a cluster without a provisioner: claims stay Pending.
        sc(NO_PROVISIONER_STORAGE_CLASS, "kubernetes.io/no-provisioner", default=False),
    ]


@contextlib.contextmanager
def control_plane(
    workdir: Path,
    bin_dir: Path,
    timeout: float = START_TIMEOUT_S,
    processes: ProcessSet | None = None,
) -> Iterator[KubeCluster]:
    """Start etcd, the control plane and kwok under ``workdir``; stop all of it on exit.

    Every wait is bounded by ``timeout`` and fails early, with the log tail, if a process dies.
    ``processes`` lets a caller see what was started (and that it was stopped).
    """
    etcd = shutil.which("etcd")
    if etcd is None:
        raise ControlPlaneError(
            "etcd is not installed (Debian package etcd-server; .ci/run installs it)"
        )
    for binary in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"):
        if not (bin_dir / binary).is_file():
            raise ControlPlaneError(f"{bin_dir / binary} is missing; run {BUILD_SCRIPT}")

    workdir.mkdir(parents=True, exist_ok=True)
    log_dir = workdir / "logs"
    log_dir.mkdir(exist_ok=True)
    pki = make_pki(workdir / "pki")
    etcd_port, etcd_peer_port, api_port = free_port(), free_port(), free_port()
    kcm_port, sched_port, kwok_port = free_port(), free_port(), free_port()
    server = f"https://127.0.0.1:{api_port}"
    kubeconfig = workdir / "kubeconfig"
    write_kubeconfig(kubeconfig, server, pki)
    # kwok would also read ~/.kwok/kwok.yaml if it exists: give it a home of its own.
    kwok_env = dict(os.environ, HOME=str(workdir / "kwok-home"))
    # etcd on tmpfs when there is one: the control plane's writes need no durability here.
    shm = Path("/dev/shm")
    etcd_data = workdir / "etcd-data"
    if shm.is_dir() and os.access(shm, os.W_OK):
        etcd_data = Path(os.path.realpath(shm)) / f"roost-kube-etcd-{os.getpid()}-{api_port}"

    procs = processes if processes is not None else ProcessSet(log_dir)
    version = read_versions()["KUBE_VERSION"]
    cluster = KubeCluster(kubeconfig, server, bin_dir, workdir, version, processes=procs)
    try:
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{etcd_peer_port}"
        procs.start(
            "etcd",
            [
                etcd,
                "--name=roost-test",
                f"--data-dir={etcd_data}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=roost-test={peer_url}",
                "--initial-cluster-state=new",
                "--logger=zap",
                "--log-level=warn",
            ],
        )
        wait_until(
            lambda: _http_ok(f"{etcd_url}/health"), 30, "etcd health", alive=procs.check_alive
        )

        procs.start(
            "kube-apiserver",
            [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--tls-cert-file={pki.server_cert}",
                f"--tls-private-key-file={pki.server_key}",
                f"--client-ca-file={pki.ca_cert}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                # No kubelet or real network: keep the "kubernetes" Service without endpoints
                # rather than publish 127.0.0.1 in them.
                "--endpoint-reconciler-type=none",
                # Debian's etcd (3.4.23) cannot answer watch progress requests, so this server
                # cannot stream lists; with WatchList on (the 1.34 default) it would still turn
                # every watch from resourceVersion 0 into one and fail it ("RequestWatchProgress
                # is disabled"), and kwok, which watches that way, would react tens of seconds
                # late. Plain list+watch works with any etcd.
                "--feature-gates=WatchList=false",
                "--profiling=false",
                "--v=1",
            ],
        )
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        ctx.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        wait_until(
            lambda: _https_ok(f"{server}/readyz", ctx),
            timeout,
            "kube-apiserver /readyz",
            alive=procs.check_alive,
        )

        common = [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
            "--v=1",
        ]
        procs.start(
            "kube-controller-manager",
            [
                str(bin_dir / "kube-controller-manager"),
                *common,
                f"--secure-port={kcm_port}",
                f"--cert-dir={workdir / 'kcm-certs'}",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca_cert}",
                f"--cluster-signing-cert-file={pki.ca_cert}",
                f"--cluster-signing-key-file={pki.ca_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allocate-node-cidrs=false",
            ],
        )
        procs.start(
            "kube-scheduler",
            [
                str(bin_dir / "kube-scheduler"),
                *common,
                f"--secure-port={sched_port}",
                f"--cert-dir={workdir / 'scheduler-certs'}",
            ],
        )
        procs.start(
            "kwok",
            [
                str(bin_dir / "kwok"),
                f"--kubeconfig={kubeconfig}",
                f"--config={KWOK_STAGES}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
                "--node-ip=127.0.0.1",
                f"--node-port={kwok_port}",
                f"--server-address=127.0.0.1:{kwok_port}",
                f"--cidr={POD_CIDR}",
                "--node-lease-duration-seconds=40",
            ],
            env=kwok_env,
        )
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE  # self-signed serving certs, loopback only
        for name, port in (("kube-controller-manager", kcm_port), ("kube-scheduler", sched_port)):
            wait_until(
                lambda port=port: _https_ok(f"https://127.0.0.1:{port}/healthz", unverified),
                timeout,
                f"{name} /healthz",
                alive=procs.check_alive,
            )

        cluster.apply([_node_manifest(n, z) for n, z in zip(NODE_NAMES, NODE_ZONES, strict=True)])
        cluster.apply(_storage_classes())

        def nodes_ready() -> bool:
            items = cluster.get("nodes")["items"]
            ready = {
                n["metadata"]["name"]
                for n in items
                if any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in n.get("status", {}).get("conditions", [])
                )
            }
            return ready >= set(NODE_NAMES)

        cluster.wait_for(nodes_ready, timeout, "three Ready kwok nodes")
        # Pods cannot be created in a namespace before its "default" ServiceAccount exists.
        cluster.wait_for(
            lambda: (
                cluster.kubectl("get", "serviceaccount", "default", check=False).returncode == 0
            ),
            timeout,
            "the default ServiceAccount",
        )
        yield cluster
    finally:
        procs.stop_all()
        shutil.rmtree(etcd_data, ignore_errors=True)
