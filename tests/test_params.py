"""pipeline.params: the build parameters are declared once, and the CLI, the flow and the served deployment all
take exactly that list."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path

import pytest

from pipeline import orchestrate as flows
from pipeline.params import BUNDLED_CSV_DIR, FIELDS, BuildParams, deployment_parameters
from pipeline.schedule import add_serve_arguments, make_deployments, serve_config_from_args


def _parser(add) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add(p)
    return p


def _cli_dests(p: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in p._actions if a.dest != "help"}


def test_every_build_parameter_reaches_cli_flow_and_deployment():
    names = set(FIELDS)
    flow_params = set(inspect.signature(build_fn := flows.build_flow.fn).parameters)
    assert flow_params == names, "build_flow's parameters are BuildParams' fields"
    assert set(flows.build_flow.parameters.properties) == names, "Prefect's parameter schema"
    for n, f in FIELDS.items():
        want = inspect.Parameter.empty if f.metadata["required"] else f.default
        assert inspect.signature(build_fn).parameters[n].default == want, n

    cli = {n for n, f in FIELDS.items() if f.metadata["cli"]}
    assert cli == names - {"proxy_secret"}
    build_cli = next(a for a in flows.make_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert cli <= _cli_dests(build_cli.choices["build"])
    assert cli <= _cli_dests(build_cli.choices["serve"])

    args = _parser(add_serve_arguments).parse_args(["--out", "o", "--split", "test"])
    cfg = serve_config_from_args(args)
    assert set(cfg.rebuild_parameters) | {"out_dir"} == names
    (rebuild,) = make_deployments(flows.build_flow, None, cfg)
    # The deployment's parameters validate against the flow: nothing it sends is unknown to build_flow.
    flows.build_flow.validate_parameters({**rebuild.parameters})


def test_cli_values_reach_the_build_config(tmp_path):
    cookies = tmp_path / "cookies.txt"
    cookies.write_text("# Netscape HTTP Cookie File\n")
    a = flows.make_parser().parse_args(
        ["build", "--split", "test", "--out", str(tmp_path / "o"), "--csv", "a.csv", "--csv", "b.csv",
         "--limit", "7", "--download-workers", "2", "--cpu-workers", "3", "--samples-per-shard", "16",
         "--frames", "4", "--cookies", str(cookies), "--sleep", "1.5", "--clip-timeout", "60",
         "--max-retries", "1", "--backoff", "0.5", "--retry-permanent", "--max-failure-rate", "0.2",
         "--no-report", "--url-template", "http://127.0.0.1:9/{youtube_id}.mp4", "--js-runtime", "node:/usr/bin/node",
         "--allow-no-js", "--max-per-hour", "120", "--on-rate-limit", "wait", "--rate-limit-pause", "90",
         "--cache-dir", str(tmp_path / "c"), "--extractor-args", "youtube:player_client=web",
         "--retry-reason", "login-required,drm"])
    p = flows.build_params_from_args(a)
    assert p.report is False and p.retry_permanent is True and p.csv == ["a.csv", "b.csv"]
    cfg = p.to_build_config(proxy="http://proxy:1")
    assert (cfg.limit, cfg.cpu_workers, cfg.samples_per_shard, cfg.extract.frames) == (7, 3, 16, 4)
    d = cfg.download
    assert (d.workers, d.sleep_s, d.timeout_s, d.max_retries, d.backoff_base_s, d.proxy) == \
        (2, 1.5, 60.0, 1, 0.5, "http://proxy:1")
    assert d.cookies == cookies and cfg.max_failure_rate == 0.2 and cfg.csv == [Path("a.csv"), Path("b.csv")]
    assert (d.js_runtime, d.allow_no_js, d.max_per_hour, d.on_rate_limit, d.rate_limit_pause_s) == \
        ("node:/usr/bin/node", True, 120.0, "wait", 90.0)
    assert d.cache_dir == tmp_path / "c" and d.extractor_args == ("youtube:player_client=web",)
    assert cfg.retry_reasons == ["login-required", "drm"]


def test_download_defaults_pace_youtube_and_share_one_cache(tmp_path):
    d = BuildParams(split="test", out_dir=str(tmp_path)).download_config()
    assert (d.max_per_hour, d.cache_dir, d.js_runtime) == (250, tmp_path / ".cache" / "yt-dlp", "deno")
    assert BuildParams(split="test", out_dir="o", max_per_hour=0).download_config().max_per_hour is None
    loopback = BuildParams(split="test", out_dir="o", url_template="http://127.0.0.1:9/{youtube_id}.mp4")
    assert loopback.download_config().max_per_hour is None


def test_split_alone_reads_the_bundled_csv(tmp_path):
    p = BuildParams(split="val", out_dir=str(tmp_path))
    assert p.csv_paths() == [BUNDLED_CSV_DIR / "val.csv"]
    assert deployment_parameters(p)["csv"] == [str(BUNDLED_CSV_DIR / "val.csv")]
    with pytest.raises(ValueError, match=r"split 'dev' has no bundled CSV .*bundled splits: test, train, val"):
        BuildParams(split="dev", out_dir=str(tmp_path)).csv_paths()


def test_build_without_csv_for_unknown_split_exits_1_before_any_work(tmp_path, capsys):
    assert flows.main(["build", "--split", "dev", "--out", str(tmp_path / "o"), "--no-prefect"]) == 1
    assert "split 'dev' has no bundled CSV" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_prune_without_publish_is_refused():
    with pytest.raises(ValueError, match="--prune needs --publish"):
        BuildParams(split="test", out_dir="o", prune=True)
    assert dataclasses.is_dataclass(BuildParams)
