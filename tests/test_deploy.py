"""deploy/arc: the Actions Runner Controller values of the two ephemeral GPU runner pools README "Runner trust"
describes: parsed, and checked for what the trust boundary rests on (two pools in two runner groups, one GPU and a
fixed share of the host per job, nothing kept between jobs, no root), and named as the workflow names them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
POOLS = {"main": ROOT / "deploy" / "arc" / "values-main-h100.yaml", "pr": ROOT / "deploy" / "arc" / "values-pr-h100.yaml"}


def values(pool: str) -> dict:
    return yaml.safe_load(POOLS[pool].read_text())


@pytest.mark.parametrize("pool", sorted(POOLS))
def test_each_pool_is_one_gpu_per_ephemeral_pod_without_root_or_host_paths(pool):
    spec = values(pool)["template"]["spec"]
    (runner,) = [c for c in spec["containers"] if c["name"] == "runner"]
    resources = runner["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert resources["limits"]["cpu"] == resources["requests"]["cpu"]  # a fixed share: timing needs a quiet host
    assert spec["securityContext"]["runAsNonRoot"] and not runner["securityContext"]["allowPrivilegeEscalation"]
    assert spec["restartPolicy"] == "Never"
    assert all("hostPath" not in volume for volume in spec.get("volumes", []))  # nothing outlives the pod
    assert {volume["name"]: volume for volume in spec["volumes"]}["work"].get("emptyDir") is not None
    assert values(pool)["minRunners"] == 0


def test_main_and_pull_requests_run_in_separate_groups_and_scale_sets_named_as_the_workflow_says():
    main, pr = values("main"), values("pr")
    assert (main["runnerGroup"], pr["runnerGroup"]) == ("fluxgate-main", "fluxgate-pr")
    assert main["runnerScaleSetName"] != pr["runnerScaleSetName"]
    assert main["maxRunners"] == 1  # main's history is one chain
    workflow = (ROOT / ".github" / "workflows" / "perf-gpu.yml").read_text()
    for name in (main["runnerScaleSetName"], pr["runnerScaleSetName"], "fluxgate-main", "fluxgate-pr"):
        assert name in workflow, name
