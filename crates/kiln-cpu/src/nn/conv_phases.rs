//! The im2col source of a strided 2-D conv, as phase planes.
//!
//! With a stride of `s >= 2` along the row, packing an im2col panel gathers
//! every `s`-th input of each input row, per tap and channel: a sixth of a
//! 3x3 stride-2 conv's time in ResNet-50, where ONNX Runtime's direct NCHWc
//! kernels pay nothing for the stride. Instead, each input channel is split
//! once into its `sy x sx` phase planes: plane `(py, px)` holds
//! `X[sy * r + py][sx * q + px]`, zero past the input's end. Every tap then
//! reads one plane at a stride-1 shift, so the panels pack by contiguous
//! copies, and each input is gathered once instead of once per tap. Only the
//! planes some tap reads are built.

use super::conv::ConvGeometry;
use super::depthwise::deinterleave2;
use rayon::prelude::*;

/// How a strided conv reads its phase planes.
pub(crate) struct PhaseSplit {
    /// The geometry the im2col fill sees: each channel's planes as one
    /// stride-1 input of `hp x wp` positions per plane.
    pub geo: ConvGeometry,
    /// Each tap's shift (rows, columns) within its plane.
    pub taps: Vec<Vec<isize>>,
    /// Each tap's plane, as the offset of its first element within the
    /// channel's planes.
    pub bases: Vec<usize>,
    /// The planes built, `(py, px)` each, in storage order.
    planes: Vec<(usize, usize)>,
    strides: (usize, usize),
    /// The input plane's rows and columns.
    src: (usize, usize),
}

impl PhaseSplit {
    /// The split for a 2-D conv whose row stride is 2 or more and whose taps
    /// share planes; `None` for any other (a stride along the rows alone
    /// already packs by copies).
    pub fn plan(geo: &ConvGeometry, taps: &[Vec<isize>]) -> Option<PhaseSplit> {
        let (&[h, w], &[sy, sx]) = (&geo.in_sp[..], &geo.win.strides[..]) else {
            return None;
        };
        if sx < 2 || sy == 0 {
            return None;
        }
        let (hp, wp) = (h.div_ceil(sy), w.div_ceil(sx));
        let plane = hp * wp;
        let mut planes: Vec<(usize, usize)> = Vec::new();
        let mut shifted = Vec::with_capacity(taps.len());
        let mut bases = Vec::with_capacity(taps.len());
        for t in taps {
            let (oy, ox) = (t[0], t[1]);
            let (py, dy) = (
                oy.rem_euclid(sy as isize) as usize,
                oy.div_euclid(sy as isize),
            );
            let (px, dx) = (
                ox.rem_euclid(sx as isize) as usize,
                ox.div_euclid(sx as isize),
            );
            let slot = match planes.iter().position(|&p| p == (py, px)) {
                Some(i) => i,
                None => {
                    planes.push((py, px));
                    planes.len() - 1
                }
            };
            shifted.push(vec![dy, dx]);
            bases.push(slot * plane);
        }
        // A plane no two taps share (a 1x1 strided conv's) gives the fill
        // nothing to reuse: gathering straight from X costs the same as the
        // split, which would then be one more pass (1x1 stride 2, 256 -> 512
        // on 56x56: 0.563 against 0.553 ms).
        if planes.len() == taps.len() {
            return None;
        }
        let mut fill_geo = geo.clone();
        fill_geo.in_sp = vec![hp, wp];
        fill_geo.win.strides = vec![1, 1];
        fill_geo.in_n = planes.len() * plane;
        Some(PhaseSplit {
            geo: fill_geo,
            taps: shifted,
            bases,
            planes,
            strides: (sy, sx),
            src: (h, w),
        })
    }

    /// Floats of one channel's planes.
    pub fn channel_len(&self) -> usize {
        self.geo.in_n
    }

    /// Splits channels into `dst` (`channel_len()` floats each, in parallel):
    /// channel `j`'s `h x w` plane starts at `x[src_of(j)]`.
    pub fn split(&self, x: &[f32], src_of: impl Fn(usize) -> usize + Sync, dst: &mut [f32]) {
        let len = self.channel_len();
        if len == 0 {
            return;
        }
        dst.par_chunks_mut(len)
            .with_min_len(4)
            .enumerate()
            .for_each(|(j, d)| self.split_channel(&x[src_of(j)..], d));
    }

    fn split_channel(&self, x: &[f32], dst: &mut [f32]) {
        let (sy, sx) = self.strides;
        let (h, w) = self.src;
        let (hp, wp) = (self.geo.in_sp[0], self.geo.in_sp[1]);
        let plane = hp * wp;
        // Columns px, px + sx, ... of input row iy that exist.
        let live = |iy: usize, px: usize| {
            if iy < h {
                w.saturating_sub(px).div_ceil(sx)
            } else {
                0
            }
        };
        let slot = |py: usize, px: usize| self.planes.iter().position(|&p| p == (py, px));
        // Inside a function compiled for the CPU's vector ISA: the
        // deinterleaving loops vectorize as permutes there.
        crate::fastmath::simd(
            #[inline(always)]
            || {
                for (i, &(py, px)) in self.planes.iter().enumerate() {
                    // Stride 2 with both column phases of the row built: one
                    // pass over each input row writes both, from the even
                    // phase's turn.
                    let pair = match (sx, px) {
                        (2, 0) => slot(py, 1),
                        (2, 1) if slot(py, 0).is_some() => continue,
                        _ => None,
                    };
                    for r in 0..hp {
                        let iy = sy * r + py;
                        let row = &x[(iy * w).min(x.len())..];
                        match pair {
                            Some(j) => {
                                let (lo, hi) = dst.split_at_mut(i.max(j) * plane);
                                let (even, odd) = if i < j {
                                    (&mut lo[i * plane..][..plane], &mut hi[..plane])
                                } else {
                                    (&mut hi[..plane], &mut lo[j * plane..][..plane])
                                };
                                let (even, odd) =
                                    (&mut even[r * wp..][..wp], &mut odd[r * wp..][..wp]);
                                let (ne, no) = (live(iy, 0), live(iy, 1));
                                deinterleave2(
                                    &row[..(ne + no).min(row.len())],
                                    &mut even[..ne],
                                    &mut odd[..no],
                                );
                                even[ne..].fill(0.0);
                                odd[no..].fill(0.0);
                            }
                            None => {
                                let out = &mut dst[i * plane + r * wp..][..wp];
                                let n = live(iy, px);
                                let (head, tail) = out.split_at_mut(n);
                                tail.fill(0.0);
                                if n > 0 {
                                    head.iter_mut()
                                        .zip(row[px..].iter().step_by(sx))
                                        .for_each(|(d, &v)| *d = v);
                                }
                            }
                        }
                    }
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::conv::{conv_geometry, window_taps};
    use kiln_ir::{AutoPad, ConvAttrs};

    /// Every plane element is the input it stands for, or zero past the
    /// input's end; each tap's plane and shift read the input its original
    /// offsets name.
    #[test]
    fn planes_and_taps_match_the_strided_input() {
        for (h, w, k, s, pad) in [(9, 11, 3, 2, 1), (10, 7, 5, 3, 2), (8, 13, 5, 2, 2)] {
            let a = ConvAttrs {
                auto_pad: AutoPad::NotSet,
                dilations: vec![1, 1],
                group: 1,
                kernel_shape: vec![k, k],
                pads: vec![pad; 4],
                strides: vec![s, s],
            };
            let geo = conv_geometry(&a, &[1, 2, h, w], &[1, 2, k, k]).unwrap();
            let taps = window_taps(&geo.win, &geo.kshape);
            let split = PhaseSplit::plan(&geo, &taps).expect("taps share planes");
            let x: Vec<f32> = (0..2 * h * w).map(|i| i as f32 + 1.0).collect();
            let len = split.channel_len();
            let mut planes = vec![f32::NAN; 2 * len];
            split.split(&x, |j| j * h * w, &mut planes);
            let (hp, wp) = (h.div_ceil(s), w.div_ceil(s));
            assert_eq!(split.geo.in_sp, [hp, wp]);
            for ci in 0..2 {
                for (t, (orig, (shift, &base))) in taps
                    .iter()
                    .zip(split.taps.iter().zip(&split.bases))
                    .enumerate()
                {
                    for r in 0..hp as isize {
                        for q in 0..wp as isize {
                            // Plane (r, q) shifted by the tap is input
                            // (s r + oy, s q + ox) of the original tap.
                            let (pr, pq) = (r + shift[0], q + shift[1]);
                            let (iy, ix) = (s as isize * r + orig[0], s as isize * q + orig[1]);
                            let inside = |v: isize, n: usize| v >= 0 && v < n as isize;
                            let want = if inside(iy, h) && inside(ix, w) {
                                x[ci * h * w + iy as usize * w + ix as usize]
                            } else {
                                0.0
                            };
                            let got = if inside(pr, hp) && inside(pq, wp) {
                                planes[ci * len + base + pr as usize * wp + pq as usize]
                            } else {
                                0.0
                            };
                            assert_eq!(
                                got, want,
                                "{h}x{w} k{k} s{s}: channel {ci} tap {t} at ({r}, {q})"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn unshared_planes_and_unit_row_strides_are_not_split() {
        let geo = |k: usize, s: [usize; 2]| {
            let a = ConvAttrs {
                auto_pad: AutoPad::NotSet,
                dilations: vec![1, 1],
                group: 1,
                kernel_shape: vec![k, k],
                pads: vec![0; 4],
                strides: s.to_vec(),
            };
            conv_geometry(&a, &[1, 4, 12, 12], &[4, 4, k, k]).unwrap()
        };
        for (k, s) in [(1, [2, 2]), (2, [2, 2]), (3, [2, 1])] {
            let g = geo(k, s);
            let taps = window_taps(&g.win, &g.kshape);
            assert!(PhaseSplit::plan(&g, &taps).is_none(), "k{k} s{s:?}");
        }
    }
}
