"""A real Kubernetes control plane for tests: etcd and kube-apiserver on 127.0.0.1.

`KubeApiServer` is this project's counterpart of controller-runtime's envtest.
scripts/install-k8s.sh builds the kube-apiserver, etcd and helm binaries from
the Go module proxy into ~/.cache/eventrouter/k8s/<version>/bin. `start()`
generates with openssl a CA, a serving certificate, an admin client
certificate in the group system:masters and a service-account signing key.
It then starts etcd and kube-apiserver with their data in a temporary folder
(mode 0700), waits for /readyz and writes a kubeconfig for the admin user.

There is no controller manager, scheduler or node: objects are stored and
validated, and admission and CRD validation run, but no pod ever runs, no
namespace is ever finalized and no service account gets a token.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from tests.processes import free_port, launcher

REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / "scripts" / "install-k8s.sh"

HOST = "127.0.0.1"
# kube-apiserver requires a Service CIDR and assigns ClusterIPs from it. With no
# nodes and no kube-proxy, nothing routes to those addresses.
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "eventrouter-test-admin"
CERTIFICATE_DAYS = 7

logger = logging.getLogger(__name__)


class KubeApiServerError(RuntimeError):
    """Failure to build, configure, start or reach etcd or kube-apiserver."""


def ensure_binaries() -> Path:
    """Run scripts/install-k8s.sh and return the folder with kube-apiserver, etcd and helm.

    The first run on a machine builds them, which takes many minutes. Raises
    KubeApiServerError with the script's output, which includes the go
    command's output when a build failed.
    """
    result = subprocess.run(
        ["bash", str(INSTALL_SCRIPT), "--print-bin-dir"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise KubeApiServerError(
            f"{INSTALL_SCRIPT} failed with exit code {result.returncode}, "
            f"so the Kubernetes binaries are missing.\n{result.stdout}{result.stderr}"
        )
    bin_dir = Path(result.stdout.strip().splitlines()[-1])
    for name in ("kube-apiserver", "etcd", "helm"):
        if not (bin_dir / name).is_file():
            raise KubeApiServerError(f"{INSTALL_SCRIPT} succeeded but {bin_dir / name} is missing.")
    return bin_dir


def run_openssl(args: Sequence[str], cwd: Path) -> None:
    """Run `openssl` with `args` in `cwd`. Raises KubeApiServerError with its output on failure."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise KubeApiServerError(
            "openssl not found on PATH. Install it (Debian: apt-get install openssl)."
        )
    result = subprocess.run(
        [openssl, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise KubeApiServerError(
            f"openssl {' '.join(args)} failed with exit code {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )


def _new_ec_key(name: str, cwd: Path) -> None:
    run_openssl(
        ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name], cwd
    )


def _sign_certificate(cwd: Path, name: str, subject: str, extensions: Sequence[str]) -> None:
    """Create <name>.key and <name>.crt, a certificate for `subject` signed by ca.crt."""
    _new_ec_key(f"{name}.key", cwd)
    run_openssl(
        ["req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr"], cwd
    )
    (cwd / f"{name}.ext").write_text("\n".join(extensions) + "\n", encoding="utf-8")
    run_openssl(
        [
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            str(CERTIFICATE_DAYS),
            "-sha256",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.crt",
        ],
        cwd,
    )


def generate_certificates(cert_dir: Path) -> None:
    """Write the CA, serving, admin client and service-account keys into `cert_dir`.

    Files: ca.crt/ca.key (the CA for serving and client certificates),
    serving.crt/serving.key (for 127.0.0.1 and localhost), admin.crt/admin.key
    (user ADMIN_USER in group system:masters, which RBAC lets do anything) and
    service-account.key/service-account.pub. All keys are ECDSA P-256.
    """
    cert_dir.mkdir(parents=True, exist_ok=True)
    _new_ec_key("ca.key", cert_dir)
    run_openssl(
        [
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-sha256",
            "-days",
            str(CERTIFICATE_DAYS),
            "-subj",
            "/CN=eventrouter-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            "-out",
            "ca.crt",
        ],
        cert_dir,
    )
    _sign_certificate(
        cert_dir,
        "serving",
        "/CN=kube-apiserver",
        [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "extendedKeyUsage=serverAuth",
            f"subjectAltName=IP:{HOST},DNS:localhost",
        ],
    )
    # kube-apiserver maps a client certificate's CN to the user name and each O
    # to a group.
    _sign_certificate(
        cert_dir,
        "admin",
        f"/O=system:masters/CN={ADMIN_USER}",
        [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "extendedKeyUsage=clientAuth",
        ],
    )
    _new_ec_key("service-account.key", cert_dir)
    run_openssl(
        ["pkey", "-in", "service-account.key", "-pubout", "-out", "service-account.pub"],
        cert_dir,
    )


class KubeApiServer:
    """etcd and kube-apiserver on 127.0.0.1, with their data and certificates in a temporary folder.

    After `start()`, clients connect with the kubeconfig file at `kubeconfig`
    as an admin user, or to `url` with `ca_file`, `client_cert_file` and
    `client_key_file`. `stop()` ends both processes and deletes the folder.
    `extra_args` adds or overrides kube-apiserver flags, e.g.
    {"feature-gates": "..."}.
    """

    def __init__(
        self,
        *,
        startup_timeout: float = 120.0,
        extra_args: Mapping[str, str] | None = None,
    ) -> None:
        self.startup_timeout = startup_timeout
        self.extra_args = dict(extra_args or {})
        self.bin_dir: Path | None = None
        self.work_dir: Path | None = None
        self.port: int | None = None
        self.etcd_client_port: int | None = None
        self.etcd_peer_port: int | None = None
        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._ssl_context: ssl.SSLContext | None = None
        self._stopped = False

    # Paths inside work_dir. They exist only after start().

    @property
    def cert_dir(self) -> Path:
        return self._require_work_dir() / "certs"

    @property
    def ca_file(self) -> Path:
        return self.cert_dir / "ca.crt"

    @property
    def client_cert_file(self) -> Path:
        return self.cert_dir / "admin.crt"

    @property
    def client_key_file(self) -> Path:
        return self.cert_dir / "admin.key"

    @property
    def kubeconfig(self) -> Path:
        """The kubeconfig file for the admin user, with one context that is also current."""
        return self._require_work_dir() / "kubeconfig.yaml"

    @property
    def etcd_log_file(self) -> Path:
        return self._require_work_dir() / "etcd.log"

    @property
    def apiserver_log_file(self) -> Path:
        return self._require_work_dir() / "kube-apiserver.log"

    @property
    def url(self) -> str:
        """The API server's address, "https://127.0.0.1:<port>"."""
        if self.port is None:
            raise KubeApiServerError("The API server has no port yet. Call start() first.")
        return f"https://{HOST}:{self.port}"

    @property
    def etcd_url(self) -> str:
        if self.etcd_client_port is None:
            raise KubeApiServerError("etcd has no port yet. Call start() first.")
        return f"http://{HOST}:{self.etcd_client_port}"

    @property
    def helm(self) -> Path:
        """The helm binary built by scripts/install-k8s.sh."""
        if self.bin_dir is None:
            raise KubeApiServerError("The binaries are not built yet. Call start() first.")
        return self.bin_dir / "helm"

    @property
    def pids(self) -> dict[str, int]:
        """The process ids of the running "etcd" and "kube-apiserver", by name."""
        processes = {"etcd": self._etcd, "kube-apiserver": self._apiserver}
        return {
            name: process.pid
            for name, process in processes.items()
            if process is not None and process.poll() is None
        }

    @property
    def is_running(self) -> bool:
        return (
            self._apiserver is not None
            and self._apiserver.poll() is None
            and self._etcd is not None
            and self._etcd.poll() is None
        )

    def start(self) -> None:
        """Build the binaries if needed, start etcd and kube-apiserver and wait for /readyz.

        Raises KubeApiServerError, with the last lines of the failing process's
        log, if etcd or kube-apiserver exits or is not ready within
        `startup_timeout` seconds. A KubeApiServer starts only once, so create a
        new one after stop().
        """
        if self._stopped:
            raise KubeApiServerError("This KubeApiServer was stopped. Create a new one.")
        if self.is_running:
            return
        started_at = time.monotonic()
        self.bin_dir = ensure_binaries()
        self.work_dir = Path(tempfile.mkdtemp(prefix="eventrouter-k8s-"))
        atexit.register(self.stop)
        generate_certificates(self.cert_dir)
        # NOTE: another process can take a port between free_port() and the
        # bind in etcd or kube-apiserver. start() then fails with the bind
        # error from the log.
        self.etcd_client_port, self.etcd_peer_port, self.port = self._three_free_ports()
        self._write_kubeconfig()
        try:
            self._start_etcd()
            self._start_apiserver()
        except BaseException:
            self.stop()
            raise
        logger.info(
            "kube-apiserver %s is ready after %.1f s (pid %s, etcd pid %s)",
            self.url,
            time.monotonic() - started_at,
            self._apiserver.pid if self._apiserver else None,
            self._etcd.pid if self._etcd else None,
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop kube-apiserver, then etcd, and delete the temporary folder. Safe to call twice.

        Each process gets SIGTERM, and SIGKILL if it is still running after
        `timeout` seconds.
        """
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        self._terminate("kube-apiserver", self._apiserver, timeout)
        self._terminate("etcd", self._etcd, timeout)
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> KubeApiServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        timeout: float = 30.0,
    ) -> Any:
        """Send a request as the admin user and return the decoded JSON response.

        Raises urllib.error.HTTPError for a status of 400 or more. Its `read()`
        returns the API server's Status object.
        """
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            f"{self.url}{path}", data=data, method=method, headers=headers
        )
        with urllib.request.urlopen(
            request, timeout=timeout, context=self._client_ssl_context()
        ) as response:
            payload = response.read()
        content_type = response.headers.get("Content-Type", "")
        if content_type.startswith("application/json"):
            return json.loads(payload)
        return payload.decode("utf-8", errors="replace")

    def create_namespace(
        self, name: str | None = None, *, labels: Mapping[str, str] | None = None
    ) -> str:
        """Create a namespace and return its name.

        Without `name`, the API server picks a unique name "test-<5 characters>"
        (metadata.generateName). Nothing deletes the namespace. With no
        controller manager, a deleted namespace stays in phase Terminating.
        """
        metadata: dict[str, Any] = {"name": name} if name else {"generateName": "test-"}
        if labels:
            metadata["labels"] = dict(labels)
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": metadata}
        created = self.request("POST", "/api/v1/namespaces", namespace)
        return str(created["metadata"]["name"])

    def log_tail(self, log_file: Path, max_lines: int = 60) -> str:
        """Return the last `max_lines` lines of `log_file`, or a note if it does not exist."""
        if not log_file.exists():
            return f"({log_file} does not exist)"
        with log_file.open("rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - 64 * 1024))
            text = file.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-max_lines:])

    def apiserver_args(self) -> dict[str, str]:
        """Return kube-apiserver's flags, without the leading "--", including `extra_args`."""
        certs = self.cert_dir
        args = {
            "bind-address": HOST,
            "advertise-address": HOST,
            "secure-port": str(self.port),
            "etcd-servers": self.etcd_url,
            "cert-dir": str(certs),
            "tls-cert-file": str(certs / "serving.crt"),
            "tls-private-key-file": str(certs / "serving.key"),
            "client-ca-file": str(certs / "ca.crt"),
            "authorization-mode": "RBAC",
            "service-account-issuer": SERVICE_ACCOUNT_ISSUER,
            "service-account-key-file": str(certs / "service-account.pub"),
            "service-account-signing-key-file": str(certs / "service-account.key"),
            "service-cluster-ip-range": SERVICE_CLUSTER_IP_RANGE,
            # The default "lease" reconciler publishes the advertise address
            # as the endpoint of the "kubernetes" Service, and kube-apiserver
            # v1.37 exits at start-up when that address is a loopback one.
            "endpoint-reconciler-type": "none",
            # The ServiceAccount plugin rejects pods until the controller
            # manager creates each namespace's "default" service account.
            "disable-admission-plugins": "ServiceAccount",
            "allow-privileged": "true",
            "profiling": "false",
        }
        args.update(self.extra_args)
        return args

    def _three_free_ports(self) -> tuple[int, int, int]:
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(free_port())
        first, second, third = sorted(ports)
        return first, second, third

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "eventrouter-test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [
                {
                    "name": ADMIN_USER,
                    "user": {
                        "client-certificate": str(self.client_cert_file),
                        "client-key": str(self.client_key_file),
                    },
                }
            ],
            "contexts": [
                {
                    "name": "eventrouter-test",
                    "context": {"cluster": "eventrouter-test", "user": ADMIN_USER},
                }
            ],
            "current-context": "eventrouter-test",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    def _client_ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            context = ssl.create_default_context(cafile=str(self.ca_file))
            context.load_cert_chain(str(self.client_cert_file), str(self.client_key_file))
            self._ssl_context = context
        return self._ssl_context

    def _launch(self, command: list[str], log_file: Path) -> subprocess.Popen[bytes]:
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            # Kill the child if the test process dies without running stop().
            command = [setpriv, "--pdeathsig", "KILL", *command]
        with log_file.open("ab") as log:
            log.write(f"==== starting: {' '.join(command)}\n".encode())
            log.flush()
            return launcher.popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                start_new_session=True,
            )

    def _start_etcd(self) -> None:
        assert self.bin_dir is not None
        peer_url = f"http://{HOST}:{self.etcd_peer_port}"
        command = [
            str(self.bin_dir / "etcd"),
            "--name=eventrouter-test",
            f"--data-dir={self._require_work_dir() / 'etcd-data'}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=eventrouter-test={peer_url}",
            "--initial-cluster-state=new",
            # The data lives only as long as the test session, so losing it
            # on a crash costs nothing, and skipping fsync speeds up writes.
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]
        self._etcd = self._launch(command, self.etcd_log_file)
        self._wait_until("etcd", self._etcd, self.etcd_log_file, self._etcd_is_healthy)

    def _start_apiserver(self) -> None:
        assert self.bin_dir is not None
        command = [str(self.bin_dir / "kube-apiserver")]
        command += [f"--{name}={value}" for name, value in self.apiserver_args().items()]
        self._apiserver = self._launch(command, self.apiserver_log_file)
        self._wait_until(
            "kube-apiserver", self._apiserver, self.apiserver_log_file, self._apiserver_is_ready
        )

    def _wait_until(
        self,
        name: str,
        process: subprocess.Popen[bytes],
        log_file: Path,
        ready: Callable[[], bool],
    ) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while not ready():
            return_code = process.poll()
            if return_code is not None:
                raise KubeApiServerError(
                    f"{name} exited with code {return_code} during start-up. "
                    f"Last lines of {log_file}:\n{self.log_tail(log_file)}"
                )
            if time.monotonic() > deadline:
                raise KubeApiServerError(
                    f"Timed out after {self.startup_timeout:.0f} s waiting for {name} to "
                    f"become ready. Last lines of {log_file}:\n{self.log_tail(log_file)}"
                )
            time.sleep(0.1)

    def _etcd_is_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as response:
                return bool(json.loads(response.read()).get("health") == "true")
        except (OSError, ValueError) as exc:  # URLError is a subclass of OSError.
            logger.debug("etcd %s is not healthy yet: %r", self.etcd_url, exc)
            return False

    def _apiserver_is_ready(self) -> bool:
        try:
            return bool(self.request("GET", "/readyz", timeout=2) == "ok")
        except urllib.error.HTTPError as exc:
            # /readyz returns 500 until every post-start hook has finished.
            logger.debug("kube-apiserver %s is not ready yet: HTTP %s", self.url, exc.code)
            return False
        except OSError as exc:
            logger.debug("kube-apiserver %s is not reachable yet: %r", self.url, exc)
            return False

    def _terminate(
        self, name: str, process: subprocess.Popen[bytes] | None, timeout: float
    ) -> None:
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning(
                "%s (pid %s) did not exit within %.0f s of SIGTERM, so sending SIGKILL",
                name,
                process.pid,
                timeout,
            )
            process.kill()
            process.wait()
        logger.info("Stopped %s (pid %s), exit code %s", name, process.pid, process.returncode)

    def _require_work_dir(self) -> Path:
        if self.work_dir is None:
            raise KubeApiServerError("The API server has no work folder yet. Call start() first.")
        return self.work_dir
