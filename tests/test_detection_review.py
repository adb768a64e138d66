"""ReviewKD on the FPN outputs of the detection glue (mdistiller/detection/review.py).

Expectations written out here: HCL as the paper / ReviewKD's detection code define it (MSE at full size plus
block-mean pooled MSE at 4, 2, 1 when smaller than the map's height, weights 1, 1/2, 1/4, 1/8, normalised) and the
ABF fusion with plain convolutions; the tiny detectors of tests/test_detection_models.py."""

import copy

import pytest
import torch
import torch.nn.functional as F

from mdistiller.detection.rcnn_distill import DetectionStep, detector_task_terms, dkd_term
from mdistiller.detection.review import FPN_LEVELS, FPNReview, reviewkd_term
from test_detection_models import _batch, _glue  # the same tiny detectors and batch

SHAPES = [(16, 24), (8, 12), (4, 8), (2, 4), (1, 2)]  # P2..P6 of a wide image; block pooling divides evenly


def _fpn(seed, channels=256):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(2, channels, h, w, generator=g) for name, (h, w) in zip(FPN_LEVELS, SHAPES)}


def _step(student_fpn, teacher_fpn):
    empty = torch.zeros(0)
    return DetectionStep({}, [], empty, empty, empty, empty, empty, [], student_fpn, teacher_fpn)


def _block_mean(x, size):
    n, c, h, w = x.shape
    return x.reshape(n, c, size, h // size, size, w // size).mean(dim=(3, 5))


def _plain_hcl(fused, teacher):
    total = 0.0
    for fs, ft in zip(fused, teacher):
        h = fs.shape[2]
        terms, weights = [((fs - ft) ** 2).mean()], [1.0]
        for size in (4, 2, 1):
            if size < h:
                weights.append(weights[-1] / 2)
                terms.append(weights[-1] * ((_block_mean(fs, size) - _block_mean(ft, size)) ** 2).mean())
        total = total + sum(terms) / sum(weights)
    return total


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _plain_fusion(review, maps):
    """ABF written out (eval-mode BN): deepest level reduced and output; each shallower level's reduced map mixed
    with the nearest-upsampled carried map by two sigmoid weights from a 1x1 conv on both."""
    outputs, carried = [None] * len(maps), None
    for i in reversed(range(len(maps))):
        abf = review.fusion.abfs[i]
        x = _bn(F.conv2d(maps[i], abf.reduce[0].weight), abf.reduce[1])
        if carried is not None:
            up = carried[:, :, torch.arange(x.shape[2]) * carried.shape[2] // x.shape[2]][
                :, :, :, torch.arange(x.shape[3]) * carried.shape[3] // x.shape[3]]
            conv = abf.attention[0]
            a = torch.sigmoid(F.conv2d(torch.cat([x, up], 1), conv.weight, conv.bias))
            x = x * a[:, :1] + up * a[:, 1:]
        outputs[i] = _bn(F.conv2d(x, abf.output[0].weight, padding=1), abf.output[1])
        carried = x
    return outputs


def test_term_is_hcl_of_the_fused_student_maps():
    torch.manual_seed(0)
    review = FPNReview().eval()
    student, teacher = _fpn(2), _fpn(3)
    fused = review(list(student.values()))
    assert [tuple(f.shape[-2:]) for f in fused] == SHAPES and all(f.shape[1] == 256 for f in fused)
    plain_fused = _plain_fusion(review, list(student.values()))
    for a, b in zip(fused, plain_fused):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    expected = _plain_hcl(plain_fused, list(teacher.values()))
    term = reviewkd_term(_step(student, teacher), review, weight=1.2)
    torch.testing.assert_close(term.value, 1.2 * expected, rtol=1e-5, atol=1e-6)
    assert term.kind == "distill"


def test_student_equal_to_teacher_after_fusion_gives_zero():
    review = FPNReview().eval()
    student = _fpn(4)
    with torch.no_grad():
        target = dict(zip(FPN_LEVELS, review(list(student.values()))))
    assert float(reviewkd_term(_step(student, target), review).value.detach()) == pytest.approx(0.0, abs=1e-12)


def test_step_exposes_both_fpns():
    glue = _glue()
    images, targets = _batch()
    step = glue(images, targets)
    assert list(step.student_fpn) == list(FPN_LEVELS) == list(step.teacher_fpn)
    image_list, _ = glue.student.transform(images, targets)
    with torch.no_grad():
        own_student = glue.student.backbone(image_list.tensors)
        own_teacher = glue.teacher.backbone(image_list.tensors)
    for name in FPN_LEVELS:
        assert step.student_fpn[name].shape[1] == 256 and step.student_fpn[name].requires_grad
        assert not step.teacher_fpn[name].requires_grad
        torch.testing.assert_close(step.student_fpn[name], own_student[name])
        torch.testing.assert_close(step.teacher_fpn[name], own_teacher[name])


def test_gradients_reach_student_and_fusion_not_teacher():
    glue = _glue()
    review = FPNReview().train()
    step = glue(*_batch())
    reviewkd_term(step, review).value.backward()
    grads = {n: p.grad for n, p in glue.student.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("backbone.fpn"))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("backbone.body"))
    assert all(g is None for n, g in grads.items() if n.startswith(("rpn", "roi_heads")))
    for name, p in review.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in glue.teacher.parameters())


@pytest.mark.parametrize("method", ["reviewkd", "reviewkd_dkd"])
def test_one_sgd_step(method):
    glue = _glue()
    review = FPNReview().train()
    params = [p for p in glue.student.parameters() if p.requires_grad] + list(review.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    before = {n: p.detach().clone() for n, p in glue.student.named_parameters() if p.requires_grad}
    review_before = copy.deepcopy(review.state_dict())
    teacher_before = copy.deepcopy(glue.teacher.state_dict())
    step = glue(*_batch())
    terms = detector_task_terms(step)
    terms["reviewkd"] = reviewkd_term(step, review, weight=1.2)  # R18 <- R101
    if method == "reviewkd_dkd":
        terms["dkd"] = dkd_term(step)
    assert all(torch.isfinite(t.value) for t in terms.values())
    opt.zero_grad()
    sum(t.value for t in terms.values()).backward()
    opt.step()
    moved = [n for n, p in glue.student.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(n.startswith("backbone.fpn") for n in moved) and any("box_head" in n for n in moved)
    assert all(not torch.equal(v, review_before[k]) for k, v in review.state_dict().items() if "weight" in k)
    for k, v in glue.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k])


def test_bad_steps_are_refused():
    review = FPNReview()
    with pytest.raises(ValueError, match="RCNNDistillGlue.forward"):
        reviewkd_term(_step({}, {}), review)
    student, teacher = _fpn(2), _fpn(3)
    teacher["pool"] = teacher["pool"][:, :128]
    with pytest.raises(ValueError, match="level 'pool'"):
        reviewkd_term(_step(student, teacher), review)
    four = dict(list(_fpn(2).items())[:4])
    with pytest.raises(ValueError, match="num_levels=4"):
        reviewkd_term(_step(four, dict(list(_fpn(3).items())[:4])), review)
