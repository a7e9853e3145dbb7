"""Cloud output directories through fsspec, against a real S3-compatible server (moto) on loopback: checkpoints
uploaded whole and listed only once complete, `latest` and rotation in the bucket, a resume after an interrupted
upload, --init_from from the bucket, and one clear error for an unreachable or missing bucket."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from helpers import FAST, HANG_GUARD_S, StallingProxy, fails, losses, run, wait_until
from ttt_train import checkpoint as ckpt
from ttt_train import rundir

moto_server = pytest.importorskip("moto.server", reason="moto[server] and s3fs are test extras (CI installs them)")
pytest.importorskip("s3fs", reason="s3fs is optional (pip install s3fs)")


@pytest.fixture(scope="module")
def server():
    s3 = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, port = s3.get_host_and_port()
    yield f"http://{host}:{port}"
    s3.stop()


@pytest.fixture
def bucket(server, monkeypatch, tmp_path):
    import boto3

    for key, value in {"AWS_ENDPOINT_URL": server, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "TTT_STAGING_DIR": str(tmp_path / "staging")}.items():
        monkeypatch.setenv(key, value)
    name = f"runs-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    boto3.client("s3", endpoint_url=server).create_bucket(Bucket=name)
    return name


def listing(bucket, prefix):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/{prefix}", detail=False))


def test_checkpoints_go_to_the_bucket_and_a_resume_after_an_interrupted_upload_is_exact(bucket, tmp_path):
    import s3fs

    url = f"s3://{bucket}/run"
    flags = ["--max_train_steps", "6", "--save_checkpoint_freq", "2", "--save_total_limit", "2"]
    local = run(tmp_path, *flags, out="local")  # the same run on a local disk, for the losses
    import train_ttt

    train_ttt.main([*FAST, "--output_dir", url, *flags])
    names = listing(bucket, "run")
    assert {"checkpoint-4", "checkpoint-6", "final_model", "metrics.jsonl", "training_summary.json"} <= set(names)
    assert "checkpoint-2" not in names  # rotated in the bucket
    fs = s3fs.S3FileSystem()
    assert fs.exists(f"{bucket}/run/checkpoint-6/model.safetensors")
    assert fs.exists(f"{bucket}/run/checkpoint-6/.upload-complete")
    metrics = [json.loads(line) for line in fs.cat(f"{bucket}/run/metrics.jsonl").decode().splitlines()]
    assert {r["step"]: r["loss"] for r in metrics if "loss" in r} == losses(local)

    # checkpoint-6's upload interrupted halfway (its marker and its weights missing), the final model lost too
    fs.rm(f"{bucket}/run/checkpoint-6/.upload-complete")
    fs.rm(f"{bucket}/run/checkpoint-6/model.safetensors")
    fs.rm(f"{bucket}/run/final_model", recursive=True)
    train_ttt.main([*FAST, "--output_dir", url, *flags, "--max_train_steps", "8", "--resume_from_checkpoint",
                    "latest"])  # resumes from checkpoint-4: the last complete upload
    metrics = [json.loads(line) for line in fs.cat(f"{bucket}/run/metrics.jsonl").decode().splitlines()]
    resumed = {r["step"]: r["loss"] for r in metrics if "loss" in r}
    assert sorted(resumed) == list(range(1, 9)) and all(resumed[s] == losses(local)[s] for s in range(1, 7))
    assert {"checkpoint-8", "final_model"} <= set(listing(bucket, "run"))
    # a model in the bucket starts another run
    out = tmp_path / "from-bucket"
    train_ttt.main([*FAST[2:], "--init_from", f"{url}/final_model", "--max_train_steps", "1", "--output_dir",
                    str(out)])
    assert (out / "final_model" / "model.safetensors").exists()


def test_a_bucket_run_is_not_overwritten(bucket, capsys):
    url = f"s3://{bucket}/taken"
    import train_ttt

    train_ttt.main([*FAST, "--output_dir", url, "--max_train_steps", "2"])
    fails(capsys, *FAST, "--output_dir", url, "--max_train_steps", "2", match="already holds a run")


def test_unreachable_or_missing_buckets_are_one_error_line(bucket, monkeypatch, capsys):
    fails(capsys, *FAST, "--output_dir", "s3://no-such-bucket-here/run", match="cannot write to s3://no-such-bucket")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    fails(capsys, *FAST, "--output_dir", f"s3://{bucket}/run", match=f"cannot write to s3://{bucket}/run")
    fails(capsys, *FAST, "--output_dir", "ftp2://host/run", match="unsupported storage scheme ftp2://")


def test_an_upload_that_fails_halfway_stops_the_run_and_the_resume_starts_before_it(bucket, tmp_path, capsys,
                                                                                   monkeypatch):
    """The connection drops while checkpoint-4's weights are uploaded: the run stops with one error line, the bucket
    holds checkpoint-4 without its marker, and `latest` resumes from checkpoint-2 to the same losses."""
    import s3fs

    import train_ttt

    url = f"s3://{bucket}/cut"
    flags = ["--max_train_steps", "6", "--save_checkpoint_freq", "2", "--save_total_limit", "5"]
    local = run(tmp_path, *flags, out="local")
    original = s3fs.S3FileSystem._put_file

    async def dropping(self, lpath, rpath, *args, **kwargs):
        if "checkpoint-4/model.safetensors" in rpath:
            raise ConnectionResetError("connection reset by peer")
        return await original(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", dropping)
    fails(capsys, *FAST, "--output_dir", url, *flags, match=f"cannot upload to {url}")
    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", original)
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/cut/checkpoint-4/config.json")  # half uploaded
    assert not fs.exists(f"{bucket}/cut/checkpoint-4/.upload-complete")
    train_ttt.main([*FAST, "--output_dir", url, *flags, "--resume_from_checkpoint", "latest"])
    out = capsys.readouterr().out
    assert "at step 2" in out  # checkpoint-4 did not count
    metrics = [json.loads(line) for line in fs.cat(f"{bucket}/cut/metrics.jsonl").decode().splitlines()]
    assert {r["step"]: r["loss"] for r in metrics if "loss" in r} == losses(local)
    assert fs.exists(f"{bucket}/cut/checkpoint-4/.upload-complete")  # uploaded again, whole


def trainer_env(tmp_path, **extra) -> dict:
    return {**os.environ, "TTT_STAGING_DIR": str(tmp_path / "staging"), **extra}


def test_two_fresh_runs_on_one_bucket_folder_one_is_refused_naming_the_other(bucket, tmp_path):
    """Two trainers started together on the same s3:// folder: the first to claim it trains; the other is refused
    with one line naming it, before writing anything there."""
    url = f"s3://{bucket}/shared"
    argv = [sys.executable, str(ROOT / "train_ttt.py"), *FAST, "--output_dir", url, "--max_train_steps", "20"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=trainer_env(tmp_path / str(i))) for i in range(2)]
    outputs = [proc.communicate(timeout=HANG_GUARD_S) for proc in procs]  # read as they run: no full pipe
    results = [(proc.returncode, *output) for proc, output in zip(procs, outputs)]
    assert sorted(status for status, _, _ in results) == [0, 1], results
    winner, loser = sorted(results, key=lambda r: r[0])
    errors = [line for line in loser[2].splitlines() if "error" in line]
    assert len(errors) == 1 and f"output_dir {url} is claimed by run" in errors[0], loser[2]
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    claim = json.loads(fs.cat(f"{bucket}/shared/.run-claim.json"))
    assert f"pid {claim['pid']} on" in errors[0]


def test_a_resume_elsewhere_takes_the_claim_and_the_first_run_writes_no_more(bucket):
    from ttt_train.remote import RemoteDir, RemoteError

    url = f"s3://{bucket}/taken-over"
    first, second = RemoteDir(url), RemoteDir(url)
    first.claim(fresh=True)
    first.check_owner()
    with pytest.raises(RemoteError, match="is claimed by run"):
        RemoteDir(url).claim(fresh=True)
    assert "took over the claim of run" in second.claim(fresh=False)
    with pytest.raises(RemoteError, match="is now claimed by run .* not this run"):
        first.upload_file(ROOT / "README.md", "README.md")


@pytest.mark.slow
def test_an_endpoint_that_stalls_mid_run_is_one_line_and_the_local_copy_stays(server, bucket, tmp_path):
    """The S3 endpoint stops answering (a proxy in front of moto holds every connection) after the first checkpoint
    is in the bucket: the next upload is given up after its bounded deadline, with one error line naming the local
    copy, which is complete."""
    host, port = server.removeprefix("http://").split(":")
    proxy = StallingProxy((host, int(port)))
    url = f"s3://{bucket}/stalled"
    argv = [sys.executable, str(ROOT / "train_ttt.py"), *FAST, "--output_dir", url, "--max_train_steps", "100000",
            "--save_checkpoint_freq", "2"]
    env = trainer_env(tmp_path, AWS_ENDPOINT_URL=proxy.url, TTT_REMOTE_TIMEOUT="2")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    import s3fs

    fs = s3fs.S3FileSystem()  # straight to moto

    def uploaded():
        fs.invalidate_cache()
        return fs.exists(f"{bucket}/stalled/checkpoint-2/.upload-complete")

    try:
        wait_until(uploaded, proc, "checkpoint-2 in the bucket")
        proxy.stall()
        _, err = proc.communicate(timeout=HANG_GUARD_S)  # the trainer's own deadline ends it: no kill from here
    finally:
        proc.kill()
        proxy.close()
    assert proc.returncode == 1, err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and f"{url}: no answer within" in errors[0] and "the local copy is in" in errors[0], err
    staging = Path(errors[0].rsplit("the local copy is in ", 1)[1])
    step, newest = rundir.list_checkpoints(staging)[-1]
    assert step >= 2 and ckpt.validate_checkpoint(newest)["step"] == step


def test_a_fresh_run_that_stops_on_bad_input_gives_its_claim_back(bucket, tmp_path, capsys):
    url = f"s3://{bucket}/typo"
    fails(capsys, *FAST, "--output_dir", url, "--dataset_name", str(tmp_path / "nope.txt"), match="does not exist")
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/typo/.run-claim.json")
    import train_ttt

    train_ttt.main([*FAST, "--output_dir", url, "--max_train_steps", "2"])  # the corrected command is not refused
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/typo/.run-claim.json") and fs.exists(f"{bucket}/typo/final_model/.upload-complete")


def test_a_resume_from_an_earlier_bucket_checkpoint_sets_the_later_ones_aside_only_once_it_starts(bucket, capsys):
    """Resuming from checkpoint-2 of a bucket run that reached step 6: a start that fails on bad input moves
    nothing; the resume that starts moves checkpoint-4, checkpoint-6, final_model and the best model (from step 6)
    to abandoned/<time>/ in the bucket (never deleted), as a local resume does, so that `latest`, rotation and
    --save_best follow the new branch."""
    import s3fs

    import train_ttt

    url = f"s3://{bucket}/branch"
    flags = ["--max_train_steps", "6", "--save_checkpoint_freq", "2", "--save_total_limit", "5", "--save_best",
             "--eval_steps", "2"]
    train_ttt.main([*FAST, "--output_dir", url, *flags])
    before = set(listing(bucket, "branch"))
    assert {"checkpoint-2", "checkpoint-4", "checkpoint-6", "final_model", "best_model"} <= before
    best_state = f"{bucket}/branch/best_model/{rundir.TRAINER_STATE}"
    assert json.loads(s3fs.S3FileSystem().cat(best_state))["step"] == 6  # the loss falls: the last is the best
    fails(capsys, *FAST, "--output_dir", url, *flags, "--resume_from_checkpoint", f"{url}/checkpoint-2",
          "--ttt_layer_type", "mlp", match="--ttt_layer_type mlp conflicts with checkpoint")
    assert set(listing(bucket, "branch")) == before
    train_ttt.main([*FAST, "--output_dir", url, *flags, "--max_train_steps", "3", "--resume_from_checkpoint",
                    f"{url}/checkpoint-2"])
    after = set(listing(bucket, "branch"))
    assert {"checkpoint-2", "checkpoint-3", "final_model", "best_model", "abandoned"} <= after
    assert not {"checkpoint-4", "checkpoint-6"} & after
    [moved] = listing(bucket, "branch/abandoned")
    assert set(listing(bucket, f"branch/abandoned/{moved}")) == {"checkpoint-4", "checkpoint-6", "final_model",
                                                                  "best_model"}
    assert json.loads(s3fs.S3FileSystem().cat(best_state))["step"] == 3  # the new branch's best
