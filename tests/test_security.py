"""Key handling, redaction, TLS and auth failures through a real nginx in front of the real cluster."""

import base64
import json
import logging
import os
import subprocess
import sys

import pytest
from faultproxy import FaultProxy
from support import ROOT, agent_env, count, generate, run_push
from tlsnginx import KEY, KEY_ID, KEY_SECRET, READONLY_KEY, Nginx, tls_env

from pushagent.cluster.auth import authorization_header
from pushagent.cluster.tls import insecure_warning
from pushagent.config import Config, load_config
from pushagent.errors import ConfigError
from pushagent.ops.logs import TextFormatter
from pushagent.redact import redact, register_secret

# -- key handling -----------------------------------------------------------------------------------------


def key_file(tmp_path, mode=0o600, text=KEY):
    path = tmp_path / "api.key"
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def test_api_key_file_private_to_the_user_is_used(tmp_path):
    config = Config(api_key_file=str(key_file(tmp_path, 0o400)))
    assert authorization_header(config, environ={"PUSHAGENT_API_KEY": "other"}) == {"Authorization": f"ApiKey {KEY}"}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_api_key_file_readable_by_others_is_refused_with_the_fix(tmp_path, mode):
    path = key_file(tmp_path, mode)
    with pytest.raises(ConfigError) as error:
        authorization_header(Config(api_key_file=str(path)), environ={})
    assert str(error.value) == (f"api_key_file: permissions {mode:04o} for {path} are too open: it must not be "
                                f"accessible by others\n  hint: chmod 600 {path}")
    assert KEY not in str(error.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file away")
def test_api_key_file_owned_by_someone_else_is_refused(tmp_path):
    path = key_file(tmp_path)
    os.chown(path, 65534, -1)
    with pytest.raises(ConfigError, match=r"owned by uid 65534, not by you.*\n  hint: chown \$USER"):
        authorization_header(Config(api_key_file=str(path)), environ={})


def test_missing_or_empty_key_file_and_env_key_and_basic_auth(tmp_path):
    with pytest.raises(ConfigError, match="cannot read .*No such file"):
        authorization_header(Config(api_key_file=str(tmp_path / "nope")), environ={})
    with pytest.raises(ConfigError, match="is empty"):
        authorization_header(Config(api_key_file=str(key_file(tmp_path, text=""))), environ={})
    assert authorization_header(Config(), environ={"PUSHAGENT_API_KEY": f" {KEY}\n"}) == {
        "Authorization": f"ApiKey {KEY}"}
    assert authorization_header(Config(), environ={}) == {}
    with pytest.raises(ConfigError, match="username is set but password_file is not"):
        authorization_header(Config(username="pusher"), environ={})
    password = tmp_path / "password"
    password.write_text("hunter2-canary")
    password.chmod(0o600)
    header = authorization_header(Config(username="pusher", password_file=str(password)), environ={})
    assert header == {"Authorization": "Basic " + base64.b64encode(b"pusher:hunter2-canary").decode()}


def test_the_key_is_never_a_config_value(tmp_path):
    config_file = tmp_path / "pushagent.yaml"
    config_file.write_text(f"api_key: {KEY}\n")
    with pytest.raises(ConfigError, match="unknown configuration key"):
        load_config(str(config_file), environ={})
    assert KEY not in repr(load_config(None, environ={"PUSHAGENT_API_KEY": KEY}))


def test_redaction_hides_the_key_its_base64_forms_and_its_secret_even_in_tracebacks():
    register_secret(KEY)
    text = f"a {KEY} b {base64.b64encode(KEY.encode()).decode()} c {KEY_ID}:{KEY_SECRET} d {KEY_SECRET}"
    assert KEY_SECRET not in redact(text) and KEY not in redact(text)
    try:
        raise ValueError(f"header was ApiKey {KEY}")
    except ValueError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert KEY not in TextFormatter("%(message)s").format(record)


def test_insecure_is_needed_for_plain_http_off_loopback_and_warns():
    with pytest.raises(ConfigError, match="refusing plain http:// to search.example.org"):
        load_config(None, flags={"url": "http://search.example.org:9200"}, environ={})
    config = load_config(None, flags={"url": "http://search.example.org:9200", "insecure": True}, environ={})
    assert "over plain http://, unencrypted" in insecure_warning(config)
    assert insecure_warning(load_config(None, environ={})) is None


def test_insecure_run_warns_on_stderr(tmp_path):
    data = generate(tmp_path / "w.jsonl", 10)
    code, _, stderr = run_push("http://search.example.org:9200", "words", tmp_path / "state", data,
                               extra=["--insecure", "--dry-run", str(tmp_path / "dry")])
    assert code == 0, stderr
    assert "WARNING --insecure: sending the API key and the data to search.example.org over plain http://" in stderr


# -- allowed_indices and allow_delete ---------------------------------------------------------------------


def test_index_outside_allowed_indices_is_refused_before_anything_is_sent(cluster_url, tmp_path):
    data = generate(tmp_path / "w.jsonl", 10)
    with FaultProxy(cluster_url) as proxy:
        code, _, stderr = run_push(proxy.url, "secret-index", tmp_path / "state", data,
                                   env={"PUSHAGENT_ALLOWED_INDICES": "words,names"})
        assert proxy.requests == []
    assert code == 2
    assert "index 'secret-index' is not in allowed_indices ['names', 'words']" in stderr


def test_record_index_and_delete_ops_are_checked_per_record(cluster_url, index, tmp_path):
    data = tmp_path / "w.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"ipa_id": "a", "target": index}, {"ipa_id": "b", "target": "other-index"},
        {"ipa_id": "c", "target": index, "op": "delete"}, {"ipa_id": "d"}]) + "\n")
    env = {"PUSHAGENT_INDEX_FIELD": "target", "PUSHAGENT_OP_FIELD": "op", "PUSHAGENT_ALLOWED_INDICES": index}
    with FaultProxy(cluster_url) as proxy:
        code, report, stderr = run_push(proxy.url, index, tmp_path / "state", data, env=env)
        sent = [i for r in proxy.bulk_requests() for i in r.ids]
    assert (code, report["indexed"], report["quarantined"]) == (3, 2, 2), stderr
    assert sorted(sent) == ["a", "d"]
    with FaultProxy(cluster_url) as proxy:
        code, report, stderr = run_push(proxy.url, index, tmp_path / "state2", data,
                                        env={**env, "PUSHAGENT_ALLOW_DELETE": "true"})
        assert "c" in [i for r in proxy.bulk_requests() for i in r.ids]
    assert report["quarantined"] == 1, stderr


# -- through nginx: TLS, API key, 429 ---------------------------------------------------------------------


def test_push_through_nginx_with_tls_and_api_key(nginx, certs, cluster_url, index, tmp_path):
    data = generate(tmp_path / "w.jsonl", 2_000)
    code, report, stderr = run_push(nginx.url(), index, tmp_path / "state", data, extra=["--chunk-docs", "500"],
                                    env=tls_env(certs))
    assert code == 0, stderr
    assert report["indexed"] == 2_000 and count(cluster_url, index) == 2_000


@pytest.mark.parametrize("variant, ca, message", [
    ("good", False, "TLS: the certificate of localhost:{port} is signed by a CA this machine does not trust "
                    "(unable to get local issuer certificate)\n  hint: set ca_bundle to the PEM file of the CA"),
    ("expired", True, "TLS: the certificate of localhost:{port} has expired (certificate has expired)\n"
                      "  hint: the cluster operator must renew it"),
    ("wronghost", True, "TLS: the certificate of localhost:{port} is not issued for that host name (Hostname "
                        "mismatch, certificate is not valid for 'localhost'.)\n  hint: use in url the host name"),
])
def test_tls_failures_name_the_host_and_the_reason(nginx, certs, index, tmp_path, variant, ca, message):
    data = generate(tmp_path / "w.jsonl", 20)
    env = tls_env(certs) if ca else {"PUSHAGENT_API_KEY": KEY}
    code, report, stderr = run_push(nginx.url(variant), index, tmp_path / "state", data, env=env)
    assert code == 1
    assert message.format(port=nginx.ports[variant]) in report["error"]
    assert report["indexed"] == 0


@pytest.mark.parametrize("key, status, check", [(None, 401, "authentication"), ("d3Jvbmc6a2V5", 401, "authentication"),
                                                (READONLY_KEY, 403, "privileges")])
def test_refused_key_stops_at_once_with_exit_4_and_names_the_doctor_check(nginx, certs, index, tmp_path,
                                                                          key, status, check):
    data = generate(tmp_path / "w.jsonl", 3_000)
    state = tmp_path / "state"
    code, report, stderr = run_push(nginx.url(), index, state, data, extra=["--chunk-docs", "500"],
                                    env=tls_env(certs, key=key))
    assert code == 4, stderr
    assert f"(HTTP {status})" in report["error"]
    assert f"hint: run `pushagent doctor` (check: {check})" in report["error"]
    assert report["requests"] <= 2   # stopped at once: at most the requests already in flight
    checkpoint = json.loads(next((state / "runs").glob("*.json")).read_text())
    assert checkpoint["status"] == "failed" and checkpoint["position"]["line"] == 0


def test_429s_from_nginx_limit_req_are_absorbed(tmp_path, certs, cluster_url, index):
    data = generate(tmp_path / "w.jsonl", 1_500)
    env = tls_env(certs, PUSHAGENT_MAX_RETRIES="10", PUSHAGENT_MAX_CONSECUTIVE_FAILURES="100")
    with Nginx(tmp_path / "nginx", certs, cluster_url, KEY, rate_per_second=4) as throttled:
        code, report, stderr = run_push(throttled.url(), index, tmp_path / "state", data,
                                        extra=["--chunk-docs", "100"], env=env)
        statuses = throttled.statuses()
    assert code == 0, stderr
    assert statuses.count(429) > 0 and report["retries"] > 0
    assert report["indexed"] == 1_500 and count(cluster_url, index) == 1_500


# -- the leak test ----------------------------------------------------------------------------------------


def key_forms() -> list[bytes]:
    forms = [KEY, KEY_SECRET, f"{KEY_ID}:{KEY_SECRET}", base64.b64encode(KEY.encode()).decode(),
             base64.urlsafe_b64encode(KEY.encode()).decode()]
    return [form.encode() for form in forms]


def run_cli(args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pushagent", *args], capture_output=True, timeout=300,
                          env=agent_env(env), cwd=ROOT)


def leak_runs(nginx, other, certs, index, tmp_path):
    """(name, args, env) of every command, succeeding and failing, with the recognisable key."""
    data = generate(tmp_path / "w.jsonl", 300)
    state = str(tmp_path / "state")
    key_path = key_file(tmp_path)
    (tmp_path / "open").mkdir()
    open_key = key_file(tmp_path / "open", 0o644)
    push = ["push", str(data), "--index", index, "--id-field", "ipa_id", "--state-dir", state]
    good, file_key = tls_env(certs), {"PUSHAGENT_CA_BUNDLE": str(certs.ca), "PUSHAGENT_API_KEY_FILE": str(key_path)}
    return [
        ("push ok", push + ["--url", nginx.url(), "--json"], good),
        ("push again", push + ["--url", nginx.url()], file_key),
        ("push dry run", push + ["--url", nginx.url(), "--dry-run", str(tmp_path / "state" / "dry"),
                                 "--batch-id", "dry"], good),
        ("push 401", push + ["--url", other.url(), "--batch-id", "refused"], good),
        ("push unknown CA", push + ["--url", nginx.url(), "--batch-id", "ca"], {"PUSHAGENT_API_KEY": KEY}),
        ("push expired", push + ["--url", nginx.url("expired"), "--batch-id", "exp"], good),
        ("push wrong host", push + ["--url", nginx.url("wronghost"), "--batch-id", "host"], good),
        ("push bad index", push + ["--url", nginx.url(), "--index", "nope"], good),
        ("push open key file", push + ["--url", nginx.url()], {**file_key, "PUSHAGENT_API_KEY_FILE": str(open_key)}),
        ("doctor", ["doctor", "--url", nginx.url(), "--index", index, "--state-dir", state], good),
        ("doctor json", ["doctor", "--json", "--url", nginx.url(), "--index", index, "--state-dir", state], file_key),
        ("doctor 401", ["doctor", "--url", other.url(), "--index", index, "--state-dir", state], good),
        ("doctor expired", ["doctor", "--url", nginx.url("expired"), "--index", index, "--state-dir", state], good),
        ("push json logs", push + ["--url", nginx.url(), "--log-format", "json", "-v", "--batch-id", "jl"],
         {**good, "PUSHAGENT_METRICS_FILE": str(tmp_path / "state" / "pushagent.prom")}),
        ("status", ["status", "--state-dir", state], good),
        ("status json", ["status", "--json", "--state-dir", state], good),
        ("version", ["--version"], good),
    ]


def test_the_key_never_appears_in_any_output_or_state_file(nginx, certs, cluster_url, index, tmp_path):
    forms = key_forms()
    with Nginx(tmp_path / "other", certs, cluster_url, "another-key") as other:
        runs = leak_runs(nginx, other, certs, index, tmp_path)
        outcomes = {}
        for name, args, env in runs:
            for debug in ([], ["--debug"]):
                if args[0] == "--version" and debug:
                    continue
                completed = run_cli(args + debug, env)
                outcomes[name + " " + " ".join(debug)] = completed.returncode
                for stream in (completed.stdout, completed.stderr):
                    assert not [form for form in forms if form in stream], (name, debug, stream[-2000:])
    assert outcomes["push ok "] == 0 and outcomes["push 401 --debug"] == 4 and outcomes["doctor "] == 0
    assert {0, 1, 2, 4} <= set(outcomes.values())
    written = [path for path in (tmp_path / "state").rglob("*") if path.is_file()]
    for name in ("request-000001.ndjson", "queue.db", "pushagent.prom"):
        assert any(path.name == name for path in written), name
    for path in written:
        content = path.read_bytes()
        assert not [form for form in forms if form in content], path
