"""torch.compile: zero graph breaks and compiled == eager for every method, and opcheck for every op.

Before the ops became ``torch.library`` custom ops, ``torch._dynamo.explain`` on a 2-layer Llama
with 4 LoRA layers showed 24 graph breaks (25 with dropout in training; 0 for plain Llama and for HF
PEFT), ``fullgraph=True`` failed (``Unsupported context manager``) and a training loop hit the
recompile limit (a fresh dropout seed read with ``.item()`` every call).

Most checks compile with ``backend="aot_eager"`` (dynamo + AOTAutograd, which exercises the fake
implementations and the registered autograd formulas, without inductor's C++ build); one runs the
default inductor backend end to end.  ``fallback_random`` makes inductor draw nn.Dropout masks as
eager does, so compiled and eager runs are comparable bit for bit.
"""

import copy

import pytest
import torch

import peftcore as pc

from pc_testing import model_out, tiny_inputs, tiny_model

KINDS = ["llama", "gpt2", "bert"]
METHODS = ["lora0", "lora1", "bottleneck", "parallel", "compacter", "prompt", "prefix"]


def _config(method, targets):
    return {
        "lora0": lambda: pc.LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=targets),
        "lora1": lambda: pc.LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=targets),
        "bottleneck": lambda: pc.BottleneckConfig(placement="houlsby", reduction_factor=4, dropout=0.1),
        "parallel": lambda: pc.BottleneckConfig(placement="parallel", reduction_factor=4),
        "compacter": lambda: pc.CompacterConfig(reduction_factor=4),
        "prompt": lambda: pc.PromptTuningConfig(num_virtual_tokens=3),
        "prefix": lambda: pc.PrefixTuningConfig(num_virtual_tokens=3, projection=True),
    }[method]()


def _model(kind, method, train=True):
    model, targets = tiny_model(kind)
    pc.apply(model, _config(method, targets))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # make every adapter matter (LoRA B and adapter up-projections start at 0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train(train)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def eager_random():
    """inductor draws nn.Dropout masks as eager does (the config module's own patch API)."""
    with torch._inductor.config.patch(fallback_random=True):
        yield


def test_llama_with_four_lora_layers_has_no_graph_break():
    """The reported case: 2-layer Llama, q_proj and v_proj of both layers, with and without dropout."""
    ids = tiny_inputs()
    for p in (0.0, 0.1):
        model, _ = tiny_model("llama")
        pc.apply(model, pc.LoRAConfig(r=4, alpha=8, dropout=p, target_modules=["q_proj", "v_proj"]))
        assert len(list(pc.model.lora_layers(model))) == 4
        model.train()
        torch._dynamo.reset()
        ex = torch._dynamo.explain(lambda i: model(input_ids=i).logits)(ids)
        assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_fullgraph_forward_and_backward_equal_eager(kind, method, eager_random):
    model = _model(kind, method)
    ids = tiny_inputs()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def step(m):
        torch.manual_seed(0)
        out = model_out(m, ids)
        # allow_unused: BERT's pooler (a LoRA target) does not feed last_hidden_state
        grads = torch.autograd.grad(out.square().mean(), [p for _, p in trainable], allow_unused=True)
        return out, grads

    out_c, grads_c = step(compiled)
    out_e, grads_e = step(model)
    assert torch.equal(out_c, out_e)
    assert sum(g is not None for g in grads_e) > 0
    for (n, p), gc, ge in zip(trainable, grads_c, grads_e):  # compiled graphs give zeros for unused
        gc, ge = (torch.zeros_like(p) if g is None else g for g in (gc, ge))
        torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-7, msg=n)


def test_training_loop_with_dropout_never_recompiles():
    """Every step draws a new dropout seed inside the op: no value reaches the traced graph."""
    model = _model("llama", "lora1")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = tiny_inputs()
    outs = [model_out(compiled, ids)]  # the one compilation
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs += [model_out(compiled, ids) for _ in range(3)]
    assert not torch.equal(outs[-1], outs[-2])  # fresh masks each step, from the same graph


def test_compiled_under_autocast_equals_eager(eager_random):
    model = _model("llama", "lora1")
    ids = tiny_inputs()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    outs = []
    for m in (compiled, model):
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(model_out(m, ids))
    assert outs[0].dtype == torch.bfloat16 and torch.equal(outs[0], outs[1])


def test_inductor_compiles_a_lora_training_step(eager_random):
    """The default backend end to end (inductor's CPU code), forward and backward, dropout on."""
    model = _model("llama", "lora1")
    ref = copy.deepcopy(model)
    ids = tiny_inputs()
    compiled = torch.compile(model, fullgraph=True)
    torch.manual_seed(1)
    loss_c = compiled(input_ids=ids, labels=ids).loss
    loss_c.backward()
    torch.manual_seed(1)
    loss_e = ref(input_ids=ids, labels=ids).loss
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
