//! DFT, STFT, the Hann/Hamming/Blackman windows and MelWeightMatrix.
//!
//! Complex values are `[..., 2]` (re, im) and real values `[..., 1]`, as in ONNX.

use super::{checked_len, floats, from_f64, scalar_f64, scalar_i64};
use crate::util::normalize_axis;
use crate::{invalid, Result};
use kiln_ir::{DType, Tensor};
use std::f64::consts::PI;

/// One-dimensional DFT of `n` points over complex `(re, im)` samples (zero-padded
/// or truncated to `n`), producing the first `out_len` bins. `inverse` uses the
/// positive exponent and divides by `n`.
fn dft_line(
    re: &[f64],
    im: &[f64],
    n: usize,
    out_len: usize,
    inverse: bool,
) -> (Vec<f64>, Vec<f64>) {
    let m = re.len().min(n);
    // Twiddle table: angle 2*pi*j/n for j in 0..n (the product k*t taken mod n).
    let (cos, sin): (Vec<f64>, Vec<f64>) = (0..n)
        .map(|j| {
            let a = 2.0 * PI * j as f64 / n as f64;
            (a.cos(), a.sin())
        })
        .unzip();
    let sign = if inverse { 1.0 } else { -1.0 };
    let scale = if inverse { 1.0 / n as f64 } else { 1.0 };
    let mut or = vec![0.0; out_len];
    let mut oi = vec![0.0; out_len];
    for k in 0..out_len {
        let (mut sr, mut si) = (0.0, 0.0);
        for t in 0..m {
            let j = (k * t) % n;
            let (c, s) = (cos[j], sign * sin[j]);
            sr += re[t] * c - im[t] * s;
            si += re[t] * s + im[t] * c;
        }
        or[k] = sr * scale;
        oi[k] = si * scale;
    }
    (or, oi)
}

/// Inverse real DFT (numpy `irfft`): the first `n/2+1` bins of a Hermitian
/// spectrum -> `n` real samples.
fn irfft_line(re: &[f64], im: &[f64], n: usize) -> Vec<f64> {
    let half = n / 2 + 1;
    let get = |k: usize| -> (f64, f64) {
        if k < re.len() {
            (re[k], im[k])
        } else {
            (0.0, 0.0)
        }
    };
    // Full spectrum by Hermitian symmetry, then the real part of the inverse DFT.
    let mut fr = vec![0.0; n];
    let mut fi = vec![0.0; n];
    for k in 0..n {
        let (r, i) = if k < half { get(k) } else { get(n - k) };
        fr[k] = r;
        fi[k] = if k < half { i } else { -i };
    }
    dft_line(&fr, &fi, n, n, true).0
}

/// DFT along `axis` of a real (`[..., 1]`) or complex (`[..., 2]`) signal.
pub fn dft(
    x: &Tensor,
    length: Option<&Tensor>,
    axis: Option<&Tensor>,
    inverse: bool,
    onesided: bool,
) -> Result<Tensor> {
    let shape = x.shape();
    let rank = shape.len();
    if rank < 2 {
        return Err(invalid!("DFT input must have rank >= 2, got {shape:?}"));
    }
    let comps = shape[rank - 1];
    if comps != 1 && comps != 2 {
        return Err(invalid!(
            "DFT input's last dimension must be 1 (real) or 2 (complex), got {comps}"
        ));
    }
    let axis = match axis {
        Some(a) => scalar_i64(a, "DFT axis")?,
        None => -2,
    };
    let ax = normalize_axis(axis, rank)?;
    if ax == rank - 1 {
        return Err(invalid!("DFT axis {axis} is the complex dimension"));
    }
    let len = shape[ax];
    let irfft = inverse && onesided;
    let n = match length {
        Some(l) => {
            let v = scalar_i64(l, "dft_length")?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| invalid!("dft_length must be positive, got {v}"))?
        }
        None if irfft => 2 * len.saturating_sub(1),
        None => len,
    };
    if n == 0 {
        return Err(invalid!("DFT of an empty axis"));
    }
    let out_len = if irfft {
        n
    } else if onesided {
        n / 2 + 1
    } else {
        n
    };
    let out_comps = if irfft { 1 } else { 2 };
    let mut out_shape = shape.to_vec();
    out_shape[ax] = out_len;
    out_shape[rank - 1] = out_comps;
    let total = checked_len(&out_shape, "DFT output")?;
    checked_len(&[n, n], "DFT size")?;
    let v = floats(x, "DFT input")?;
    let outer: usize = shape[..ax].iter().product();
    let inner: usize = shape[ax + 1..rank - 1].iter().product();
    let mut out = vec![0.0f64; total];
    let mut re = vec![0.0; len];
    let mut im = vec![0.0; len];
    for o in 0..outer {
        for i in 0..inner {
            for t in 0..len {
                let base = ((o * len + t) * inner + i) * comps;
                re[t] = v[base];
                im[t] = if comps == 2 { v[base + 1] } else { 0.0 };
            }
            if irfft {
                let y = irfft_line(&re, &im, n);
                for (k, val) in y.into_iter().enumerate() {
                    out[(o * out_len + k) * inner + i] = val;
                }
            } else {
                let (yr, yi) = dft_line(&re, &im, n, out_len, inverse);
                for k in 0..out_len {
                    let base = ((o * out_len + k) * inner + i) * 2;
                    out[base] = yr[k];
                    out[base + 1] = yi[k];
                }
            }
        }
    }
    from_f64(out_shape, out, x.dtype())
}

/// STFT of `[batch, length, 1|2]` signals into `[batch, frames, bins, 2]`.
pub fn stft(
    x: &Tensor,
    frame_step: &Tensor,
    window: Option<&Tensor>,
    frame_length: Option<&Tensor>,
    onesided: bool,
) -> Result<Tensor> {
    let shape = x.shape();
    if shape.len() != 3 || !(shape[2] == 1 || shape[2] == 2) {
        return Err(invalid!(
            "STFT signal must be [batch, length, 1 or 2], got {shape:?}"
        ));
    }
    let (batch, len, comps) = (shape[0], shape[1], shape[2]);
    let step = scalar_i64(frame_step, "frame_step")?;
    let step = usize::try_from(step)
        .ok()
        .filter(|&s| s > 0)
        .ok_or_else(|| invalid!("frame_step must be positive, got {step}"))?;
    let win = match window {
        Some(w) => {
            if w.rank() != 1 {
                return Err(invalid!("STFT window must be 1-D, got {:?}", w.shape()));
            }
            Some(floats(w, "STFT window")?)
        }
        None => None,
    };
    let fl = match frame_length {
        Some(f) => {
            let v = scalar_i64(f, "frame_length")?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| invalid!("frame_length must be positive, got {v}"))?
        }
        None => match &win {
            Some(w) => w.len(),
            None => len,
        },
    };
    if let Some(w) = &win {
        if w.len() != fl {
            return Err(invalid!(
                "STFT window has {} values but frame_length is {fl}",
                w.len()
            ));
        }
    }
    if fl == 0 || fl > len {
        return Err(invalid!(
            "STFT frame_length {fl} does not fit the signal length {len}"
        ));
    }
    let frames = 1 + (len - fl) / step;
    let bins = if onesided { fl / 2 + 1 } else { fl };
    let out_shape = vec![batch, frames, bins, 2];
    let total = checked_len(&out_shape, "STFT output")?;
    checked_len(&[fl, fl], "STFT frame")?;
    let v = floats(x, "STFT signal")?;
    let mut out = vec![0.0f64; total];
    let mut re = vec![0.0; fl];
    let mut im = vec![0.0; fl];
    for b in 0..batch {
        for f in 0..frames {
            for t in 0..fl {
                let w = win.as_ref().map_or(1.0, |w| w[t]);
                let base = (b * len + f * step + t) * comps;
                re[t] = v[base] * w;
                im[t] = if comps == 2 { v[base + 1] * w } else { 0.0 };
            }
            let (yr, yi) = dft_line(&re, &im, fl, bins, false);
            for k in 0..bins {
                let base = ((b * frames + f) * bins + k) * 2;
                out[base] = yr[k];
                out[base + 1] = yi[k];
            }
        }
    }
    from_f64(out_shape, out, x.dtype())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    Hann,
    Hamming,
    Blackman,
}

/// A window of `size` points; `periodic` divides by `size`, symmetric by `size-1`.
pub fn window(kind: Window, size: &Tensor, periodic: bool, dtype: DType) -> Result<Tensor> {
    let n = scalar_i64(size, "size")?;
    let n = usize::try_from(n).map_err(|_| invalid!("window size must be >= 0, got {n}"))?;
    checked_len(&[n], "window")?;
    let denom = if periodic { n } else { n.saturating_sub(1) } as f64;
    let v = (0..n)
        .map(|i| {
            if denom == 0.0 {
                return 1.0;
            }
            let a = 2.0 * PI * i as f64 / denom;
            match kind {
                Window::Hann => 0.5 - 0.5 * a.cos(),
                Window::Hamming => 25.0 / 46.0 - (21.0 / 46.0) * a.cos(),
                Window::Blackman => 0.42 - 0.5 * a.cos() + 0.08 * (2.0 * a).cos(),
            }
        })
        .collect();
    from_f64(vec![n], v, dtype)
}

/// MelWeightMatrix `[dft_length/2+1, num_mel_bins]` of triangular filters
/// (the ONNX reference's bin placement).
pub fn mel_weight_matrix(
    num_mel_bins: &Tensor,
    dft_length: &Tensor,
    sample_rate: &Tensor,
    lower: &Tensor,
    upper: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    let mels = scalar_i64(num_mel_bins, "num_mel_bins")?;
    let dft_len = scalar_i64(dft_length, "dft_length")?;
    let rate = scalar_i64(sample_rate, "sample_rate")?;
    if mels <= 0 || dft_len <= 0 || rate <= 0 {
        return Err(invalid!(
            "num_mel_bins ({mels}), dft_length ({dft_len}) and sample_rate ({rate}) must be positive"
        ));
    }
    let lo = scalar_f64(lower, "lower_edge_hertz")?;
    let hi = scalar_f64(upper, "upper_edge_hertz")?;
    let mels = mels as usize;
    let bins = (dft_len / 2 + 1) as usize;
    let total = checked_len(&[bins, mels], "MelWeightMatrix output")?;
    let to_mel = |hz: f64| 2595.0 * (hz / 700.0).ln_1p() / 10f64.ln();
    let (lo_mel, hi_mel) = (to_mel(lo), to_mel(hi));
    let step = (hi_mel - lo_mel) / (mels + 2) as f64;
    let points: Vec<i64> = (0..mels + 2)
        .map(|i| {
            let mel = i as f64 * step + lo_mel;
            let hz = 700.0 * (mel / 2595.0 * 10f64.ln()).exp_m1();
            (((dft_len + 1) as f64 * hz) / rate as f64).floor() as i64
        })
        .collect();
    let mut out = vec![0.0f64; total];
    let mut set = |j: i64, i: usize, v: f64| -> Result<()> {
        let j = usize::try_from(j)
            .ok()
            .filter(|&j| j < bins)
            .ok_or_else(|| invalid!("MelWeightMatrix: frequency bin {j} is outside [0, {bins})"))?;
        out[j * mels + i] = v;
        Ok(())
    };
    for i in 0..mels {
        let (l, c, r) = (points[i], points[i + 1], points[i + 2]);
        if c == l {
            set(c, i, 1.0)?;
        } else {
            for j in l..=c {
                set(j, i, (j - l) as f64 / (c - l) as f64)?;
            }
        }
        if r > c {
            for j in c..r {
                set(j, i, (r - j) as f64 / (r - c) as f64)?;
            }
        }
    }
    from_f64(vec![bins, mels], out, dtype)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{close, f32s, t};
    use super::*;

    #[test]
    fn dft_forward_inverse_onesided() {
        // Real [1, 2, 3, 4] along axis 1 of [1, 4, 1].
        let x = t(&[1, 4, 1], vec![1.0, 2.0, 3.0, 4.0]);
        let y = dft(&x, None, Some(&Tensor::scalar(1i64)), false, false).unwrap();
        assert_eq!(y.shape(), &[1, 4, 2]);
        close(
            &f32s(&y),
            &[10.0, 0.0, -2.0, 2.0, -2.0, 0.0, -2.0, -2.0],
            1e-6,
        );
        let y1 = dft(&x, None, None, false, true).unwrap();
        assert_eq!(y1.shape(), &[1, 3, 2]);
        close(&f32s(&y1), &[10.0, 0.0, -2.0, 2.0, -2.0, 0.0], 1e-6);
        // Inverse of the full spectrum gives the signal back (complex).
        let back = dft(&y, None, None, true, false).unwrap();
        close(
            &f32s(&back),
            &[1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 4.0, 0.0],
            1e-6,
        );
        // irfft of the one-sided spectrum gives the real signal, last dim 1.
        let back = dft(&y1, None, None, true, true).unwrap();
        assert_eq!(back.shape(), &[1, 4, 1]);
        close(&f32s(&back), &[1.0, 2.0, 3.0, 4.0], 1e-6);
        // Negative axis on a [2, 1, 2] complex input: per-row transforms of length 1.
        let xc = t(&[2, 1, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let y = dft(&xc, None, Some(&Tensor::scalar(-2i64)), false, false).unwrap();
        close(&f32s(&y), &[1.0, 2.0, 3.0, 4.0], 1e-6);
        // Along axis 0 instead: [1+2i, 3+4i] -> [4+6i, -2-2i].
        let y = dft(&xc, None, Some(&Tensor::scalar(0i64)), false, false).unwrap();
        close(&f32s(&y), &[4.0, 6.0, -2.0, -2.0], 1e-6);
        // dft_length pads with zeros.
        let y = dft(&x, Some(&Tensor::scalar(5i64)), None, false, false).unwrap();
        assert_eq!(y.shape(), &[1, 5, 2]);
        assert!((f32s(&y)[0] - 10.0).abs() < 1e-5);
        // Errors.
        assert!(dft(&x, None, Some(&Tensor::scalar(2i64)), false, false).is_err());
        assert!(dft(&t(&[4], vec![0.0; 4]), None, None, false, false).is_err());
        assert!(dft(&t(&[1, 4, 3], vec![0.0; 12]), None, None, false, false).is_err());
        assert!(dft(&x, Some(&Tensor::scalar(0i64)), None, false, false).is_err());
    }

    #[test]
    fn stft_frames() {
        let x = t(&[1, 4, 1], vec![1.0, 2.0, 3.0, 4.0]);
        let y = stft(
            &x,
            &Tensor::scalar(2i64),
            None,
            Some(&Tensor::scalar(2i64)),
            true,
        )
        .unwrap();
        assert_eq!(y.shape(), &[1, 2, 2, 2]);
        close(&f32s(&y), &[3.0, 0.0, -1.0, 0.0, 7.0, 0.0, -1.0, 0.0], 1e-6);
        let w = t(&[2], vec![0.5, 1.0]);
        let y = stft(&x, &Tensor::scalar(1i64), Some(&w), None, false).unwrap();
        assert_eq!(y.shape(), &[1, 3, 2, 2]);
        close(&f32s(&y)[..4], &[2.5, 0.0, -1.5, 0.0], 1e-6);
        // Complex signal: frame [1+1i, 2] -> bins [3+1i, -1+1i].
        let xc = t(&[1, 2, 2], vec![1.0, 1.0, 2.0, 0.0]);
        let y = stft(&xc, &Tensor::scalar(1i64), None, None, false).unwrap();
        assert_eq!(y.shape(), &[1, 1, 2, 2]);
        close(&f32s(&y), &[3.0, 1.0, -1.0, 1.0], 1e-6);
        assert!(stft(&x, &Tensor::scalar(0i64), None, None, true).is_err());
        assert!(stft(
            &x,
            &Tensor::scalar(1i64),
            None,
            Some(&Tensor::scalar(9i64)),
            true
        )
        .is_err());
    }

    #[test]
    fn windows() {
        let y = window(Window::Hann, &Tensor::scalar(4i64), true, DType::F32).unwrap();
        close(&f32s(&y), &[0.0, 0.5, 1.0, 0.5], 1e-6);
        let y = window(Window::Hann, &Tensor::scalar(3i64), false, DType::F32).unwrap();
        close(&f32s(&y), &[0.0, 1.0, 0.0], 1e-6);
        let y = window(Window::Hamming, &Tensor::scalar(2i64), false, DType::F64).unwrap();
        assert_eq!(y.dtype(), DType::F64);
        let v = y.to_f64_vec().unwrap();
        assert!((v[0] - 4.0 / 46.0).abs() < 1e-12 && (v[1] - 4.0 / 46.0).abs() < 1e-12);
        let y = window(Window::Blackman, &Tensor::scalar(3i64), false, DType::F32).unwrap();
        close(&f32s(&y), &[0.0, 1.0, 0.0], 1e-6);
        assert_eq!(
            window(Window::Hann, &Tensor::scalar(0i64), true, DType::F32)
                .unwrap()
                .len(),
            0
        );
        assert!(window(Window::Hann, &Tensor::scalar(-1i64), true, DType::F32).is_err());
    }

    #[test]
    fn mel_matrix_shape_and_rows() {
        let m = mel_weight_matrix(
            &Tensor::scalar(8i64),
            &Tensor::scalar(16i64),
            &Tensor::scalar(8192i64),
            &Tensor::scalar(0f32),
            &Tensor::scalar(4096f32),
            DType::F32,
        )
        .unwrap();
        assert_eq!(m.shape(), &[9, 8]);
        let v = f32s(&m);
        assert!(v.iter().all(|&e| (0.0..=1.0).contains(&e)));
        assert!(mel_weight_matrix(
            &Tensor::scalar(0i64),
            &Tensor::scalar(16i64),
            &Tensor::scalar(8192i64),
            &Tensor::scalar(0f32),
            &Tensor::scalar(4096f32),
            DType::F32,
        )
        .is_err());
    }
}
