//! ImageDecoder: an encoded image (u8 bytes) to an `[H, W, C]` u8 tensor.
//!
//! Decoding is the `image` crate's, with its default memory limits (so a
//! header announcing an absurd size is refused, not allocated). Formats: BMP,
//! JPEG, PNG, PNM, TIFF, WebP. JPEG 2000 is recognised and refused as
//! unsupported. Grayscale output of a colour image uses ITU-R 601-2 luma with
//! the same fixed-point rounding as Pillow's `convert("L")`, which the ONNX
//! reference uses.

use crate::util::tensor;
use crate::{invalid, unsupported, Result};
use image::{DynamicImage, ImageError};
use kiln_ir::{Tensor, TensorData};

/// Signatures of JPEG 2000 files (JP2 box) and raw codestreams (SOC + SIZ).
fn is_jpeg2000(bytes: &[u8]) -> bool {
    bytes.starts_with(&[
        0, 0, 0, 0x0c, b'j', b'P', b' ', b' ', 0x0d, 0x0a, 0x87, 0x0a,
    ]) || bytes.starts_with(&[0xff, 0x4f, 0xff, 0x51])
}

/// Pillow's `L = (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16`.
fn luma(r: u8, g: u8, b: u8) -> u8 {
    let l = (u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16;
    // The weights sum to 65536, so l <= 255.
    l.min(255) as u8
}

/// Decodes `encoded` (1-D u8) into `[H, W, 3]` (RGB/BGR) or `[H, W, 1]` (Grayscale).
pub(super) fn decode(encoded: &Tensor, pixel_format: &str) -> Result<Tensor> {
    let bytes = encoded.as_slice::<u8>().ok_or_else(|| {
        invalid!(
            "encoded_stream must be a u8 tensor, got {}",
            encoded.dtype()
        )
    })?;
    if encoded.rank() != 1 {
        return Err(invalid!(
            "encoded_stream must be 1-D, got shape {:?}",
            encoded.shape()
        ));
    }
    if is_jpeg2000(bytes) {
        return Err(unsupported!("ImageDecoder: JPEG 2000 images"));
    }
    let img = image::load_from_memory(bytes).map_err(|e| match e {
        ImageError::Unsupported(u) => unsupported!("ImageDecoder: {u}"),
        ImageError::Limits(l) => invalid!("ImageDecoder: image too large: {l}"),
        other => invalid!("ImageDecoder: cannot decode the image: {other}"),
    })?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (channels, data) = match pixel_format {
        "RGB" | "BGR" => {
            let mut v = img.into_rgb8().into_raw();
            if pixel_format == "BGR" {
                for px in v.chunks_exact_mut(3) {
                    px.swap(0, 2);
                }
            }
            (3, v)
        }
        "Grayscale" => {
            let v = match img {
                DynamicImage::ImageLuma8(_)
                | DynamicImage::ImageLumaA8(_)
                | DynamicImage::ImageLuma16(_)
                | DynamicImage::ImageLumaA16(_) => img.into_luma8().into_raw(),
                _ => img
                    .into_rgb8()
                    .into_raw()
                    .chunks_exact(3)
                    .map(|p| luma(p[0], p[1], p[2]))
                    .collect(),
            };
            (1, v)
        }
        other => return Err(invalid!("unknown pixel_format '{other}'")),
    };
    tensor(vec![h, w, channels], TensorData::U8(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2x2 24-bit BMP: bottom row first, BGR pixels, rows padded to 4 bytes.
    fn bmp_2x2() -> Vec<u8> {
        let mut f = Vec::new();
        let pixel_bytes = 2 * 8; // two rows of 6 bytes + 2 padding
        let size = 54 + pixel_bytes;
        f.extend_from_slice(b"BM");
        f.extend_from_slice(&(size as u32).to_le_bytes());
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(&54u32.to_le_bytes());
        f.extend_from_slice(&40u32.to_le_bytes());
        f.extend_from_slice(&2i32.to_le_bytes());
        f.extend_from_slice(&2i32.to_le_bytes());
        f.extend_from_slice(&1u16.to_le_bytes());
        f.extend_from_slice(&24u16.to_le_bytes());
        f.extend_from_slice(&[0; 4]); // BI_RGB
        f.extend_from_slice(&(pixel_bytes as u32).to_le_bytes());
        f.extend_from_slice(&[0; 16]);
        // Bottom row: blue, white. Top row: red, green.
        f.extend_from_slice(&[255, 0, 0, 255, 255, 255, 0, 0]);
        f.extend_from_slice(&[0, 0, 255, 0, 255, 0, 0, 0]);
        f
    }

    fn dec(bytes: Vec<u8>, fmt: &str) -> Result<Tensor> {
        decode(&Tensor::vector(bytes), fmt)
    }

    #[test]
    fn decodes_bmp_in_each_pixel_format() {
        let rgb = dec(bmp_2x2(), "RGB").unwrap();
        assert_eq!(rgb.shape(), &[2, 2, 3]);
        assert_eq!(
            rgb.as_slice::<u8>().unwrap(),
            &[255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255]
        );
        let bgr = dec(bmp_2x2(), "BGR").unwrap();
        assert_eq!(
            bgr.as_slice::<u8>().unwrap(),
            &[0, 0, 255, 0, 255, 0, 255, 0, 0, 255, 255, 255]
        );
        let gray = dec(bmp_2x2(), "Grayscale").unwrap();
        assert_eq!(gray.shape(), &[2, 2, 1]);
        // 255 * 19595 / 65536 = 76.2, 255 * 38470 / 65536 = 149.7, 255 * 7471 / 65536 = 29.1.
        assert_eq!(gray.as_slice::<u8>().unwrap(), &[76, 150, 29, 255]);
    }

    #[test]
    fn decodes_pnm() {
        let mut ppm = b"P6\n2 1\n255\n".to_vec();
        ppm.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        let t = dec(ppm, "BGR").unwrap();
        assert_eq!(t.shape(), &[1, 2, 3]);
        assert_eq!(t.as_slice::<u8>().unwrap(), &[3, 2, 1, 6, 5, 4]);
        let pgm = b"P5\n3 1\n255\n\x00\x80\xff".to_vec();
        let t = dec(pgm.clone(), "Grayscale").unwrap();
        assert_eq!(t.as_slice::<u8>().unwrap(), &[0, 128, 255]);
        let t = dec(pgm, "RGB").unwrap();
        assert_eq!(
            t.as_slice::<u8>().unwrap(),
            &[0, 0, 0, 128, 128, 128, 255, 255, 255]
        );
    }

    #[test]
    fn bad_streams_are_errors() {
        assert!(matches!(
            dec(vec![1, 2, 3, 4], "RGB"),
            Err(crate::KernelError::Unsupported(_)) | Err(crate::KernelError::Invalid(_))
        ));
        assert!(dec(vec![], "RGB").is_err());
        let mut truncated = bmp_2x2();
        truncated.truncate(60);
        assert!(dec(truncated, "RGB").is_err());
        let jp2 = vec![
            0, 0, 0, 0x0c, b'j', b'P', b' ', b' ', 0x0d, 0x0a, 0x87, 0x0a, 0, 0,
        ];
        assert!(matches!(
            dec(jp2, "RGB"),
            Err(crate::KernelError::Unsupported(_))
        ));
        // A header announcing a huge image is refused, not allocated.
        let mut huge = b"P6\n100000 100000\n255\n".to_vec();
        huge.extend_from_slice(&[0; 16]);
        assert!(dec(huge, "RGB").is_err());
        assert!(decode(&Tensor::vector(vec![1.0f32]), "RGB").is_err());
        let two_d = Tensor::from_vec(vec![1, 4], vec![0u8; 4]).unwrap();
        assert!(decode(&two_d, "RGB").is_err());
        assert!(dec(bmp_2x2(), "CMYK").is_err());
    }
}
