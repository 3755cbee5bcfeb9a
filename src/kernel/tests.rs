//! The Rust kernels against compositions of plain tch ops.

use super::*;
use crate::test_rng::Rng;
use tch::{Device, Kind, Tensor};

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let scale = b.abs().max().double_value(&[]).max(1e-30);
    (a - b).abs().max().double_value(&[]) / scale
}

fn inputs(kind: Kind) -> (Tensor, Tensor, Tensor) {
    let mut rng = Rng::new(7);
    let opts = (kind, Device::Cpu);
    let x = rng.randn(&[3, 50, 24], opts);
    let a = rng.randn(&[8, 24], opts) * 0.3;
    let b = rng.randn(&[16, 8], opts) * 0.3;
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
    tensor_ops: bool,
    tol: f64,
) {
    let (x, a, b) = inputs(kind);
    let ew = Elementwise {
        activation,
        scaling: 0.5,
        dropout,
        tensor_ops,
    };
    let g = Rng::new(8).randn(&[3, 50, 16], (kind, Device::Cpu));
    let (y, saved) = forward(&x, &a, &b, &ew, position).unwrap();
    let grads = backward(&g, &saved, Needs::ALL).unwrap();
    let [ry, rdx, rda, rdb] = reference(&x, &a, &b, &ew, position, &g);
    let label = format!("{kind:?} {activation:?} {dropout:?} {position:?} tensor_ops={tensor_ops}");
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
                for tensor_ops in [false, true] {
                    check(
                        Kind::Double,
                        activation,
                        dropout,
                        position,
                        tensor_ops,
                        1e-12,
                    );
                    check(Kind::Float, activation, dropout, position, tensor_ops, 1e-5);
                }
            }
        }
    }
}

#[test]
fn fused_passes_match_tensor_ops() {
    for kind in [Kind::Float, Kind::Double, Kind::BFloat16, Kind::Half] {
        for activation in [Activation::Silu, Activation::Relu, Activation::Identity] {
            let fused = Elementwise {
                activation,
                scaling: 2.0,
                dropout: Some(Dropout { p: 0.2, seed: 3 }),
                tensor_ops: false,
            };
            let ops = Elementwise {
                tensor_ops: true,
                ..fused
            };
            // Large enough to take the parallel path.
            let mut rng = Rng::new(9);
            let h = rng.randn(&[1100, 70], (kind, Device::Cpu));
            let gb = rng.randn(&[1100, 70], (kind, Device::Cpu));
            let (out, no_keep) = elementwise::forward(&h, &fused).unwrap();
            let (out_ops, keep) = elementwise::forward(&h, &ops).unwrap();
            assert!(no_keep.is_none());
            let keep = keep.expect("the tensor-op path keeps its mask");
            assert_eq!((keep.kind(), keep.size()), (Kind::Bool, h.size()));
            let (am, dz) = elementwise::backward(&h, &gb, &fused, None).unwrap();
            let (am_ops, dz_ops) = elementwise::backward(&h, &gb, &ops, Some(&keep)).unwrap();
            // Without the kept mask, the tensor-op backward builds the same one again.
            let (am_re, dz_re) = elementwise::backward(&h, &gb, &ops, None).unwrap();
            assert!(am_re.equal(&am_ops) && dz_re.equal(&dz_ops));
            // Half types round after each tensor op, and once in the fused loop.
            let tol = if matches!(kind, Kind::Float | Kind::Double) {
                1e-6
            } else {
                1e-2
            };
            let label = format!("{kind:?} {activation:?}");
            assert!(max_rel_diff(&out, &out_ops) < tol, "{label} forward");
            assert!(max_rel_diff(&am, &am_ops) < tol, "{label} am");
            assert!(max_rel_diff(&dz, &dz_ops) < tol, "{label} dz");
            // Same mask bits: exactly the same elements are zero.
            if activation != Activation::Relu {
                assert!(out.eq(0.0).equal(&out_ops.eq(0.0)), "{label} mask bits");
            }
            assert_eq!(
                (out_ops.kind(), am_ops.kind(), dz_ops.kind()),
                (kind, kind, kind)
            );
        }
    }
}

#[test]
fn tensor_op_branch_keeps_its_mask_and_checks_it() {
    let (x, a, b) = inputs(Kind::Float);
    for dropout in [None, Some(Dropout { p: 0.3, seed: 11 })] {
        let ew = Elementwise {
            activation: Activation::Silu,
            scaling: 0.5,
            dropout,
            tensor_ops: true,
        };
        let (y, saved) = forward(&x, &a, &b, &ew, DropoutPosition::Hidden).unwrap();
        assert_eq!(saved.keep.is_some(), dropout.is_some());
        let (y_loop, _) = forward(
            &x,
            &a,
            &b,
            &Elementwise {
                tensor_ops: false,
                ..ew
            },
            DropoutPosition::Hidden,
        )
        .unwrap();
        assert!(max_rel_diff(&y, &y_loop) < 1e-6);
        let g = y.ones_like();
        backward(&g, &saved, Needs::ALL).unwrap();
        if let Some(keep) = &saved.keep {
            for (bad, is_right_error) in [
                (keep.to_kind(Kind::Uint8), "dtype"),
                (keep.narrow(0, 0, 10), "shape"),
            ] {
                let wrong = Saved {
                    keep: Some(bad),
                    x: x.shallow_clone(),
                    a: a.shallow_clone(),
                    b: b.shallow_clone(),
                    h: saved.h.shallow_clone(),
                    elementwise: ew,
                    position: DropoutPosition::Hidden,
                };
                let err = backward(&g, &wrong, Needs::ALL).err().expect("refused");
                let matched = match err {
                    crate::CeraError::DType(_) => is_right_error == "dtype",
                    crate::CeraError::Shape(_) => is_right_error == "shape",
                    _ => false,
                };
                assert!(matched, "{err}");
            }
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
        tensor_ops: false,
    };
    let (out, _) = elementwise::forward(&h, &ew).unwrap();
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
        tensor_ops: false,
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
        tensor_ops: false,
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
        tensor_ops: false,
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
        tensor_ops: false,
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
