"""--compile: the compiled loss equals the eager one (fp32 tolerance), and a stage runs with it.

Dropout is off here: compiled code draws its dropout masks from its own random stream, so a
compiled training run is not bit-identical to an eager one (why the flag is opt-in). The
backend is aot_eager (dynamo's capture of the whole step plus AOT autograd's forward/backward
graphs): inductor's C++ code generation takes minutes per test on this 2-core CPU, so it is
exercised on a GPU (bench_gpu.sh), not in the suite."""
import torch

import objectives
import weighting
import stages
from conftest import tiny_distillation_configs, tiny_teacher_args
from distillation import DomainRelationalGraph
from modeling import BertClassifier


BACKEND = "aot_eager"


def hrkd_case():
    torch.manual_seed(0)
    teacher_config, student_config = tiny_distillation_configs()
    teachers = [objectives.freeze(BertClassifier(teacher_config, 2, num_domains=3))
                for _ in range(3)]
    student = BertClassifier(student_config, 2, num_domains=3, fit_size=16).eval()
    graph = DomainRelationalGraph(3, 3, 16, heads=2, dropout=0.0).requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        ids = torch.randint(1, 30, (2, 8), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        batches.append({"input_ids": ids * mask, "segment_ids": torch.zeros_like(ids),
                        "attention_mask": mask, "labels": torch.tensor([0, 1])})
    loss = objectives.make_hrkd_loss(teachers, [[0], [1], [2]],
                                     weighting.GraphWeighting(graph, False),
                                     objectives.DistillConfig())
    return student, batches, loss


def test_compiled_hrkd_loss_equals_eager():
    student, batches, compute_loss = hrkd_case()
    eager = compute_loss(student, batches)
    fast = stages.compiled(compute_loss, BACKEND)(student, batches)
    assert eager.keys() == fast.keys()
    for name in eager:
        torch.testing.assert_close(fast[name], eager[name], rtol=1e-5, atol=1e-6)
    # Gradients through the compiled region too.
    grads = []
    for fn in (compute_loss, stages.compiled(compute_loss, BACKEND)):
        student.zero_grad()
        fn(student, batches)["loss"].backward()
        grads.append([p.grad.clone() for p in student.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_stage_trains_with_compile(sample, tmp_path):
    import json
    import train_domain
    args = tiny_teacher_args(sample, tmp_path / "run", 2, "--do_train", "--compile",
                             "--compile_backend", "aot_eager")
    assert train_domain.main(args) == 0
    config = json.load(open(tmp_path / "run" / "config.json"))
    assert config["args"]["compile"] is True
