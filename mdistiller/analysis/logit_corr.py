"""How alike are a student's and its teacher's predictions, beyond accuracy (DOT fig. 7, after CRD and DKD).

Each class logit is a variable observed over the test images; the C x C matrix of Pearson correlations between
those variables says which classes a model treats as alike. The figure shows |corr(student) - corr(teacher)| per
class pair; its mean is one number per student (smaller: closer to the teacher). Correlation is unchanged by a
positive scale or a shift of any single logit, so only the structure of the predictions counts, not temperature.
"""

import torch


def logit_correlation(logits):
    """(C, C) Pearson correlations of the columns of an (N, C) logit matrix, in float64."""
    x = logits.double()
    x = x - x.mean(0, keepdim=True)
    cov = x.T @ x
    std = cov.diagonal().sqrt()
    return cov / (std[:, None] * std[None, :])


def correlation_difference(student_logits, teacher_logits):
    """|corr(student) - corr(teacher)|, (C, C), on the same images in the same order."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: student {tuple(student_logits.shape)}, "
                         f"teacher {tuple(teacher_logits.shape)}")
    return (logit_correlation(student_logits) - logit_correlation(teacher_logits)).abs()


@torch.no_grad()
def predict(model, loader, device):
    """(N, C) logits of `model` over `loader` in loader order (the test loader is not shuffled)."""
    model.eval().to(device)
    out = []
    for images, _labels, *_ in loader:
        logits = model(images.to(device))
        out.append((logits[0] if isinstance(logits, tuple) else logits).float().cpu())
    return torch.cat(out)
