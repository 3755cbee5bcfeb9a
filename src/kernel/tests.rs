//! The Rust kernels against compositions of plain tch ops.

use super::*;
use tch::{Device, Kind, Tensor};

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let scale = b.abs().max().double_value(&[]).max(1e-30);
    (a - b).abs().max().double_value(&[]) / scale
}

fn inputs(kind: Kind) -> (Tensor, Tensor, Tensor) {
    tch::manual_seed(7);
    let opts = (kind, Device::Cpu);
    let x = Tensor::randn([3, 50, 24], opts);
    let a = Tensor::randn([8, 24], opts) * 0.3;
    let b = Tensor::randn([16, 8], opts) * 0.3;
    (x, a, b)
}

/// The keep mask of `like`'s elements in its dtype, scaled by `1 / (1 - p)`.
fn scaled_mask(d: &Dropout, like: &Tensor) -> Tensor {
    d.keep_tensor(like.numel() as i64, Device::Cpu)
        .unwrap()
        .reshape(like.size())
        .to_kind(like.kind())
        * d.keep_scale()
}

/// The same formula with autograd over plain tch ops, the mask taken from `Dropout`
/// and applied to the hidden vector or to the input rows.
fn reference(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    ew: &Elementwise,
    position: DropoutPosition,
    g: &Tensor,
) -> [Tensor; 4] {
    let x = x.detach().set_requires_grad(true);
    let a = a.detach().set_requires_grad(true);
    let b = b.detach().set_requires_grad(true);
    let d_in = *x.size().last().unwrap();
    let rows = x.reshape([-1, d_in]);
    let rows = match (ew.dropout, position) {
        (Some(d), DropoutPosition::Input) => &rows * scaled_mask(&d, &rows),
        _ => rows,
    };
    let h = rows.matmul(&a.tr());
    let act = match ew.activation {
        Activation::Silu => h.silu(),
        Activation::Relu => h.relu(),
        Activation::Identity => h.shallow_clone(),
    };
    let act = match (ew.dropout, position) {
        (Some(d), DropoutPosition::Hidden) => &act * scaled_mask(&d, &act),
        _ => act,
    };
    let y = act.matmul(&b.tr()).reshape(g.size()) * ew.scaling;
    (&y * g).sum(y.kind()).backward();
    [y.detach(), x.grad(), a.grad(), b.grad()]
}

fn check(
    kind: Kind,
    activation: Activation,
    dropout: Option<Dropout>,
    position: DropoutPosition,
    tol: f64,
) {
    let (x, a, b) = inputs(kind);
    let ew = Elementwise {
        activation,
        scaling: 0.5,
        dropout,
    };
    let g = Tensor::randn([3, 50, 16], (kind, Device::Cpu));
    let (y, saved) = forward(&x, &a, &b, &ew, position).unwrap();
    let grads = backward(&g, &saved, Needs::ALL).unwrap();
    let [ry, rdx, rda, rdb] = reference(&x, &a, &b, &ew, position, &g);
    let label = format!("{kind:?} {activation:?} {dropout:?} {position:?}");
    assert!(max_rel_diff(&y, &ry) < tol, "forward {label}");
    assert!(max_rel_diff(&grads.x.unwrap(), &rdx) < tol, "dx {label}");
    assert!(max_rel_diff(&grads.a.unwrap(), &rda) < tol, "dA {label}");
    assert!(max_rel_diff(&grads.b.unwrap(), &rdb) < tol, "dB {label}");
}

#[test]
fn forward_backward_match_tch_composition() {
    for activation in [Activation::Silu, Activation::Relu, Activation::Identity] {
        for dropout in [None, Some(Dropout { p: 0.3, seed: 11 })] {
            for position in [DropoutPosition::Hidden, DropoutPosition::Input] {
                check(Kind::Double, activation, dropout, position, 1e-12);
                check(Kind::Float, activation, dropout, position, 1e-5);
            }
        }
    }
}

#[test]
fn fused_passes_match_tensor_ops() {
    for kind in [Kind::Float, Kind::Double, Kind::BFloat16, Kind::Half] {
        for activation in [Activation::Silu, Activation::Relu, Activation::Identity] {
            let dropout = Some(Dropout { p: 0.2, seed: 3 });
            let ew = Elementwise {
                activation,
                scaling: 2.0,
                dropout,
            };
            // Large enough to take the parallel path.
            let h = Tensor::randn([1100, 70], (kind, Device::Cpu));
            let gb = Tensor::randn([1100, 70], (kind, Device::Cpu));
            let fused = elementwise::forward(&h, &ew).unwrap();
            let ops = elementwise::forward_tensor_ops(&h, &ew).unwrap();
            let (am, dz) = elementwise::backward(&h, &gb, &ew).unwrap();
            let (am_ops, dz_ops) = elementwise::backward_tensor_ops(&h, &gb, &ew).unwrap();
            let tol = if matches!(kind, Kind::Float | Kind::Double) {
                1e-6
            } else {
                1e-2
            };
            assert!(
                max_rel_diff(&fused, &ops) < tol,
                "{kind:?} {activation:?} forward"
            );
            assert!(
                max_rel_diff(&am, &am_ops) < tol,
                "{kind:?} {activation:?} am"
            );
            assert!(
                max_rel_diff(&dz, &dz_ops) < tol,
                "{kind:?} {activation:?} dz"
            );
            assert_eq!(fused.kind(), kind);
        }
    }
}

#[test]
fn dropout_zeroes_the_masked_fraction() {
    let h = Tensor::ones([400, 64], (Kind::Float, Device::Cpu));
    let ew = Elementwise {
        activation: Activation::Identity,
        scaling: 1.0,
        dropout: Some(Dropout { p: 0.25, seed: 5 }),
    };
    let out = elementwise::forward(&h, &ew).unwrap();
    let zeros = out
        .eq(0.0)
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[]);
    assert!((zeros - 0.25).abs() < 0.02, "dropped fraction {zeros}");
    let kept = out.max().double_value(&[]);
    assert!((kept - 1.0 / 0.75).abs() < 1e-6, "kept value {kept}");
}

#[test]
fn empty_batch_gives_empty_outputs() {
    let (_, a, b) = inputs(Kind::Float);
    let x = Tensor::zeros([0, 24], (Kind::Float, Device::Cpu));
    let ew = Elementwise {
        activation: Activation::Silu,
        scaling: 1.0,
        dropout: None,
    };
    let (y, saved) = forward(&x, &a, &b, &ew, DropoutPosition::Hidden).unwrap();
    assert_eq!(y.size(), [0, 16]);
    let grads = backward(&y.zeros_like(), &saved, Needs::ALL).unwrap();
    assert_eq!(grads.x.unwrap().size(), [0, 24]);
    assert_eq!(grads.a.unwrap().double_value(&[0, 0]), 0.0);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let (x, a, b) = inputs(Kind::Float);
    let ew = Elementwise {
        activation: Activation::Silu,
        scaling: 1.0,
        dropout: None,
    };
    let wrong_d_in = Tensor::zeros([4, 23], (Kind::Float, Device::Cpu));
    assert!(matches!(
        forward(&wrong_d_in, &a, &b, &ew, DropoutPosition::Hidden),
        Err(crate::CeraError::Shape(_))
    ));
    let wrong_rank = Tensor::zeros([16, 7], (Kind::Float, Device::Cpu));
    assert!(matches!(
        forward(&x, &a, &wrong_rank, &ew, DropoutPosition::Hidden),
        Err(crate::CeraError::Shape(_))
    ));
    let ints = Tensor::zeros([4, 24], (Kind::Int64, Device::Cpu));
    assert!(matches!(
        forward(&ints, &a, &b, &ew, DropoutPosition::Hidden),
        Err(crate::CeraError::DType(_))
    ));
    let mixed = a.to_kind(Kind::Double);
    assert!(matches!(
        forward(&x, &mixed, &b, &ew, DropoutPosition::Hidden),
        Err(crate::CeraError::DType(_))
    ));
    let bad_p = Elementwise {
        dropout: Some(Dropout { p: 1.0, seed: 0 }),
        ..ew
    };
    assert!(matches!(
        forward(&x, &a, &b, &bad_p, DropoutPosition::Hidden),
        Err(crate::CeraError::Value(_))
    ));
    assert!(matches!(
        "gelu".parse::<Activation>(),
        Err(crate::CeraError::Value(_))
    ));
}

#[test]
fn input_dropout_drops_input_elements_not_hidden_ones() {
    // With A = I and identity activation the branch returns its (dropped) input, so
    // the zeros land exactly where the input mask says, at the input's rate.
    let x = Tensor::ones([300, 40], (Kind::Double, Device::Cpu));
    let eye = Tensor::eye(40, (Kind::Double, Device::Cpu));
    let d = Dropout { p: 0.25, seed: 9 };
    let ew = Elementwise {
        activation: Activation::Identity,
        scaling: 1.0,
        dropout: Some(d),
    };
    let (y, saved) = forward(&x, &eye, &eye, &ew, DropoutPosition::Input).unwrap();
    let mask = scaled_mask(&d, &x);
    assert_eq!(max_rel_diff(&y, &mask), 0.0);
    // Backward masks dx with the same mask: d(sum y)/dx = m.
    let grads = backward(&y.ones_like(), &saved, Needs::ALL).unwrap();
    assert_eq!(max_rel_diff(&grads.x.unwrap(), &mask), 0.0);
    let dropped = y.eq(0.0).to_kind(Kind::Double).mean(Kind::Double);
    assert!((dropped.double_value(&[]) - 0.25).abs() < 0.02);
}

#[test]
fn mismatches_are_told_apart_and_named_as_torch_does() {
    let (x, a, b) = inputs(Kind::Float);
    let ew = Elementwise {
        activation: Activation::Silu,
        scaling: 1.0,
        dropout: None,
    };
    let (y, saved) = forward(&x, &a, &b, &ew, DropoutPosition::Hidden).unwrap();
    let Err(crate::CeraError::DType(msg)) =
        backward(&y.to_kind(Kind::BFloat16), &saved, Needs::ALL)
    else {
        panic!("a bfloat16 grad_output must be a dtype error");
    };
    assert_eq!(
        msg,
        "grad_output is torch.bfloat16, the branch's inputs torch.float32"
    );
    let Err(crate::CeraError::DType(msg)) =
        forward(&x.to_kind(Kind::Int), &a, &b, &ew, DropoutPosition::Hidden)
    else {
        panic!("int32 x must be a dtype error");
    };
    assert!(msg.starts_with("x has dtype torch.int32"), "{msg}");
    assert!(matches!(
        "sideways".parse::<DropoutPosition>(),
        Err(crate::CeraError::Value(_))
    ));
}
