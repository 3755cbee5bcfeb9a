//! The spectral routines against plain tch compositions and the metric definitions.

use super::*;
use crate::error::CeraError;
use crate::test_rng::Rng;
use tch::{Device, Kind, Tensor};

const F64: (Kind, Device) = (Kind::Double, Device::Cpu);

/// `U diag(s) V^T` with random orthonormal `U` (rows x k) and `V` (cols x k).
fn with_singular_values(rng: &mut Rng, rows: i64, cols: i64, s: &[f64]) -> Tensor {
    let k = s.len() as i64;
    let (u, _) = Tensor::linalg_qr(&rng.randn(&[rows, k], F64), "reduced");
    let (v, _) = Tensor::linalg_qr(&rng.randn(&[cols, k], F64), "reduced");
    (u * Tensor::from_slice(s)).mm(&v.tr())
}

fn max_rel(actual: &[f64], expected: &[f64]) -> f64 {
    assert_eq!(actual.len(), expected.len());
    let scale = expected
        .iter()
        .fold(0.0_f64, |m, v| m.max(v.abs()))
        .max(1e-300);
    actual
        .iter()
        .zip(expected)
        .map(|(a, e)| (a - e).abs() / scale)
        .fold(0.0, f64::max)
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

#[test]
fn dense_recovers_known_singular_values() {
    let mut rng = Rng::new(1);
    let s = [9.0, 4.0, 2.5, 1.0, 0.3];
    for (rows, cols) in [(40, 12), (12, 40), (5, 5)] {
        let m = with_singular_values(&mut rng, rows, cols, &s);
        let got = dense::spectrum(&m).unwrap();
        let mut expected = s.to_vec();
        expected.resize(rows.min(cols) as usize, 0.0);
        assert!(max_rel(got.values(), &expected) < 1e-12, "{rows}x{cols}");
    }
    let f32_matrix = with_singular_values(&mut rng, 30, 10, &s).to_kind(Kind::Float);
    let got = dense::spectrum(&f32_matrix).unwrap();
    assert!(max_rel(&got.values()[..5], &s) < 1e-5);
}

#[test]
fn metrics_follow_their_definitions() {
    let s = vec![4.0, 2.0, 1.0, 1.0, 0.5, 0.0];
    let spectrum = Spectrum::new(s.clone()).unwrap();
    let sum: f64 = s.iter().sum();
    let sq: f64 = s.iter().map(|v| v * v).sum();
    let entropy: f64 = s
        .iter()
        .map(|v| v / sum)
        .filter(|p| *p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    assert!(rel(spectrum.effective_rank(), entropy.exp()) < 1e-12);
    assert!(rel(spectrum.stable_rank(), sq / 16.0) < 1e-12);
    let fourth: f64 = s.iter().map(|v| v.powi(4)).sum();
    assert!(rel(spectrum.participation_ratio(), sq * sq / fourth) < 1e-12);
    // Energies 16, 4, 1, 1, 0.25 of 22.25: cumulative 0.719, 0.899, 0.944, 0.989, 1.
    assert_eq!(spectrum.energy_rank(0.5).unwrap(), 1);
    assert_eq!(spectrum.energy_rank(0.9).unwrap(), 3);
    assert_eq!(spectrum.energy_rank(0.99).unwrap(), 5);
    assert_eq!(spectrum.energy_rank(1.0).unwrap(), 5);
    assert!(rel(spectrum.tail_energy(2), 2.25 / sq) < 1e-12);
    assert_eq!(spectrum.tail_energy(6), 0.0);
    assert!(
        spectrum.tail_energy(6).is_sign_positive(),
        "no negative zero"
    );
    assert!(matches!(
        spectrum.energy_rank(0.0),
        Err(CeraError::Value(_))
    ));
    assert!(matches!(
        spectrum.energy_rank(1.5),
        Err(CeraError::Value(_))
    ));
}

#[test]
fn zero_and_empty_spectra_have_rank_zero() {
    for values in [vec![0.0; 4], vec![]] {
        let s = Spectrum::new(values).unwrap();
        assert_eq!(s.effective_rank(), 0.0);
        assert_eq!(s.stable_rank(), 0.0);
        assert_eq!(s.participation_ratio(), 0.0);
        assert_eq!(s.energy_rank(0.9).unwrap(), 0);
        assert_eq!(s.tail_energy(0), 0.0);
    }
    assert!(Spectrum::new(vec![1.0, -1.0]).is_err());
    assert_eq!(Spectrum::new(vec![1.0, 3.0]).unwrap().values(), &[3.0, 1.0]);
}

#[test]
fn gram_stream_equals_dense_svd_for_any_split() {
    let mut rng = Rng::new(2);
    let x = rng.randn(&[300, 40], F64);
    let expected = dense::spectrum(&x).unwrap();
    for splits in [vec![300], vec![1, 299], vec![100, 7, 193]] {
        let mut gram = Gram::new(40, Device::Cpu).unwrap();
        let mut start = 0;
        for n in splits {
            gram.update(&x.narrow(0, start, n)).unwrap();
            start += n;
        }
        assert_eq!(gram.tokens(), 300);
        let got = gram.spectrum().unwrap();
        assert!(max_rel(got.values(), expected.values()) < 1e-10);
    }
}

#[test]
fn gram_panels_cover_the_lower_triangle() {
    // More than one panel, with a ragged last one.
    let mut rng = Rng::new(3);
    let dim = 2 * 512 + 37;
    let x = rng.randn(&[2, 5, dim], F64);
    let mut gram = Gram::new(dim, Device::Cpu).unwrap();
    gram.update(&x).unwrap();
    let rows = x.reshape([-1, dim]);
    let expected = rows.tr().mm(&rows);
    let diff = (gram.matrix().unwrap() - &expected)
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-10 * expected.abs().max().double_value(&[]));
}

#[test]
fn gram_merge_and_state_round_trip() {
    let mut rng = Rng::new(4);
    let x = rng.randn(&[50, 8], F64);
    let mut one = Gram::new(8, Device::Cpu).unwrap();
    one.update(&x).unwrap();
    let mut first = Gram::new(8, Device::Cpu).unwrap();
    let mut second = Gram::new(8, Device::Cpu).unwrap();
    first.update(&x.narrow(0, 0, 20)).unwrap();
    second.update(&x.narrow(0, 20, 30)).unwrap();
    first.merge(&second).unwrap();
    assert_eq!(first.tokens(), 50);
    assert!(
        max_rel(
            first.spectrum().unwrap().values(),
            one.spectrum().unwrap().values()
        ) < 1e-12
    );

    // A reload holds what was saved, bit for bit; its spectrum is the saved one's.
    let state = first.matrix().unwrap();
    let loaded = Gram::from_matrix(&state, first.tokens()).unwrap();
    assert_eq!(loaded.tokens(), 50);
    assert!(loaded.matrix().unwrap().equal(&state));
    assert!(
        max_rel(
            loaded.spectrum().unwrap().values(),
            first.spectrum().unwrap().values()
        ) < 1e-12
    );
    // Loading copies: updating the loaded accumulator leaves the caller's tensor alone.
    let before = state.copy();
    let mut loaded = loaded;
    loaded.update(&x).unwrap();
    assert!(state.equal(&before));

    let skewed = Tensor::eye(8, F64) + Tensor::ones([8, 8], F64).triu(1);
    assert!(matches!(
        Gram::from_matrix(&skewed, 1),
        Err(CeraError::Value(_))
    ));
    assert!(matches!(
        Gram::new(9, Device::Cpu).unwrap().merge(&one),
        Err(CeraError::Shape(_))
    ));
}

#[test]
fn lowrank_equals_dense_svd_of_the_product() {
    let mut rng = Rng::new(5);
    for (d_out, r, d_in) in [(30, 4, 20), (6, 9, 25), (25, 9, 6), (12, 3, 12)] {
        let b = rng.randn(&[d_out, r], F64);
        let a = rng.randn(&[r, d_in], F64);
        let got = lowrank::spectrum(&b, &a).unwrap();
        let expected = dense::spectrum(&b.mm(&a)).unwrap();
        assert_eq!(got.values().len(), expected.values().len());
        assert!(max_rel(got.values(), expected.values()) < 1e-12);
    }
    let b = rng.randn(&[5, 3], F64);
    let a = rng.randn(&[4, 7], F64);
    assert!(matches!(
        lowrank::spectrum(&b, &a),
        Err(CeraError::Shape(_))
    ));
}

#[test]
fn non_finite_and_bad_inputs_are_errors() {
    let m = Tensor::ones([4, 3], F64);
    let _ = m.get(1).get(2).fill_(f64::NAN);
    assert!(matches!(dense::spectrum(&m), Err(CeraError::NonFinite(_))));
    let inf = Tensor::ones([4, 3], F64) / 0.0;
    assert!(matches!(
        lowrank::spectrum(&inf, &Tensor::ones([3, 2], F64)),
        Err(CeraError::NonFinite(_))
    ));
    let mut gram = Gram::new(3, Device::Cpu).unwrap();
    assert!(matches!(gram.update(&m), Err(CeraError::NonFinite(_))));
    assert_eq!(gram.tokens(), 0);
    assert!(matches!(
        gram.update(&Tensor::ones([4, 2], F64)),
        Err(CeraError::Shape(_))
    ));
    assert!(matches!(
        dense::spectrum(&Tensor::ones([2, 2, 2], F64)),
        Err(CeraError::Shape(_))
    ));
    let complex = Tensor::ones([2, 2], (Kind::ComplexFloat, Device::Cpu));
    assert!(matches!(
        dense::spectrum(&complex),
        Err(CeraError::DType(_))
    ));
    let huge = Tensor::full([2, 2], 1e200, F64);
    let mut gram = Gram::new(2, Device::Cpu).unwrap();
    gram.update(&huge).unwrap();
    assert!(matches!(gram.spectrum(), Err(CeraError::NonFinite(_))));
}

#[test]
fn par_map_keeps_order_and_reports_errors() {
    let mut rng = Rng::new(6);
    let pairs: Vec<(Tensor, Tensor)> = (1..6)
        .map(|r| (rng.randn(&[10, r], F64), rng.randn(&[r, 8], F64)))
        .collect();
    let expected: Vec<Spectrum> = pairs
        .iter()
        .map(|(b, a)| lowrank::spectrum(b, a).unwrap())
        .collect();
    let got = par_map(pairs, |(b, a)| lowrank::spectrum(&b, &a)).unwrap();
    assert_eq!(got, expected);
    let bad = vec![Tensor::ones([2, 2], F64), Tensor::ones([2, 2], F64) / 0.0];
    assert!(matches!(
        par_map(bad, |m| dense::spectrum(&m)),
        Err(CeraError::NonFinite(_))
    ));
}

#[test]
fn centred_gram_equals_dense_svd_of_centred_rows() {
    let mut rng = Rng::new(7);
    // Columns with means well away from zero, so centring changes the spectrum.
    let x = rng.randn(&[200, 30], F64) + Tensor::arange(30, F64) * 0.5;
    let centred = &x - x.mean_dim(0, true, Kind::Double);
    let expected = dense::spectrum(&centred).unwrap();
    let uncentred = dense::spectrum(&x).unwrap();
    assert!(max_rel(uncentred.values(), expected.values()) > 1e-2);
    let mut one = Gram::centred(30, Device::Cpu).unwrap();
    one.update(&x).unwrap();
    assert!(max_rel(one.spectrum().unwrap().values(), expected.values()) < 1e-10);

    // Merged over disjoint batches, and through a saved state, the same.
    let mut first = Gram::centred(30, Device::Cpu).unwrap();
    let mut second = Gram::centred(30, Device::Cpu).unwrap();
    first.update(&x.narrow(0, 0, 70)).unwrap();
    second.update(&x.narrow(0, 70, 130)).unwrap();
    first.merge(&second).unwrap();
    assert!(max_rel(first.spectrum().unwrap().values(), expected.values()) < 1e-10);
    let sums = first.column_sums().unwrap().unwrap();
    let loaded = Gram::from_matrix(&first.matrix().unwrap(), first.tokens())
        .unwrap()
        .with_column_sums(&sums)
        .unwrap();
    assert!(loaded.is_centred());
    assert!(loaded.matrix().unwrap().equal(&first.matrix().unwrap()));
    assert!(loaded.column_sums().unwrap().unwrap().equal(&sums));
    assert!(max_rel(loaded.spectrum().unwrap().values(), expected.values()) < 1e-10);

    assert!(matches!(
        first.merge(&Gram::new(30, Device::Cpu).unwrap()),
        Err(CeraError::Value(_))
    ));
    assert!(matches!(
        Gram::new(30, Device::Cpu)
            .unwrap()
            .with_column_sums(&Tensor::zeros([29], F64)),
        Err(CeraError::Shape(_))
    ));
    // An empty centred accumulator is the zero spectrum, not a division by zero.
    let empty = Gram::centred(4, Device::Cpu).unwrap().spectrum().unwrap();
    assert!(empty.values().iter().all(|v| *v == 0.0));
}
