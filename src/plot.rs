//! `kiln jobs plot`: loss and accuracy curves of a job as a PNG, drawn and encoded here
//! (a canvas, lines, a 5×7 pixel font, and PNG with stored deflate blocks), so the CLI
//! needs no plotting or image library.

/// Colours of the series.
const TRAIN: [u8; 3] = [31, 119, 180];
const VALIDATION: [u8; 3] = [255, 127, 14];
const AXIS: [u8; 3] = [60, 60, 60];
const GRID: [u8; 3] = [225, 225, 225];

/// An RGB canvas.
pub struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    /// A white canvas.
    pub fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            pixels: vec![255; width * height * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&c);
        }
    }

    /// A line two pixels wide (Bresenham).
    fn line(&mut self, (mut x0, mut y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let mut err = dx + dy;
        loop {
            self.set(x0, y0, c);
            self.set(x0, y0 + 1, c);
            if x0 == x1 && y0 == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x0 += sx;
            }
            if e2 <= dx {
                err += dx;
                y0 += sy;
            }
        }
    }

    /// Text in the 5×7 font, `scale` pixels per font pixel, top-left at (x, y).
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            let rows = glyph(ch.to_ascii_uppercase());
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                self.set(
                                    x + (k as i64 * 6 + col) * scale + dx,
                                    y + r as i64 * scale + dy,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Encode as PNG (8-bit RGB, stored deflate blocks: large but dependency-free).
    pub fn png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity((self.width * 3 + 1) * self.height);
        for row in self.pixels.chunks(self.width * 3) {
            raw.push(0); // filter: none
            raw.extend_from_slice(row);
        }
        let mut zlib = vec![0x78, 0x01];
        let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
        for (i, block) in blocks.iter().enumerate() {
            zlib.push(u8::from(i + 1 == blocks.len()));
            let len = block.len() as u16;
            zlib.extend_from_slice(&len.to_le_bytes());
            zlib.extend_from_slice(&(!len).to_le_bytes());
            zlib.extend_from_slice(block);
        }
        zlib.extend_from_slice(&adler32(&raw).to_be_bytes());
        let mut out = vec![0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(self.width as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.height as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", &zlib);
        chunk(&mut out, b"IEND", &[]);
        out
    }
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for byte in data {
        a = (a + u32::from(*byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    (b << 16) | a
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for byte in data {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Rows of a 5×7 glyph, top first, high bit leftmost.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        '-' => [0, 0, 0, 14, 0, 0, 0],
        ' ' => [0; 7],
        'A' => [14, 17, 17, 31, 17, 17, 17],
        'C' => [14, 17, 16, 16, 16, 17, 14],
        'D' => [28, 18, 17, 17, 17, 18, 28],
        'E' => [31, 16, 16, 30, 16, 16, 31],
        'H' => [17, 17, 17, 31, 17, 17, 17],
        'I' => [14, 4, 4, 4, 4, 4, 14],
        'L' => [16, 16, 16, 16, 16, 16, 31],
        'N' => [17, 17, 25, 21, 19, 17, 17],
        'O' => [14, 17, 17, 17, 17, 17, 14],
        'P' => [30, 17, 17, 30, 16, 16, 16],
        'R' => [30, 17, 17, 30, 20, 18, 17],
        'S' => [15, 16, 16, 14, 1, 1, 30],
        'T' => [31, 4, 4, 4, 4, 4, 4],
        'U' => [17, 17, 17, 17, 17, 17, 14],
        'V' => [17, 17, 17, 17, 17, 10, 4],
        'Y' => [17, 17, 10, 4, 4, 4, 4],
        _ => [31, 17, 17, 17, 17, 17, 31],
    }
}

/// One curve: its colour and its points (epoch, value).
pub type Series = ([u8; 3], Vec<(f64, f64)>);

/// A panel: a titled chart of some series over epochs, in the box (x, y, w, h).
fn panel(c: &mut Canvas, (x, y, w, h): (i64, i64, i64, i64), title: &str, series: &[Series]) {
    let points: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    let (left, top, right, bottom) = (x + 70, y + 40, x + w - 20, y + h - 50);
    c.text(x + 70, y + 10, title, 3, AXIS);
    if points.is_empty() {
        c.text(left, top + 40, "NO DATA", 2, AXIS);
        return;
    }
    let max_x = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let (mut lo, mut hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.1), hi.max(p.1))
        });
    if (hi - lo).abs() < 1e-12 {
        lo -= 0.5;
        hi += 0.5;
    }
    let px = |e: f64| {
        left + ((e - 1.0).max(0.0) / (max_x - 1.0).max(1.0) * (right - left) as f64) as i64
    };
    let py = |v: f64| bottom - ((v - lo) / (hi - lo) * (bottom - top) as f64) as i64;
    for k in 0..=4 {
        let v = lo + (hi - lo) * k as f64 / 4.0;
        let yy = py(v);
        c.line((left, yy), (right, yy), GRID);
        c.text(x + 5, yy - 7, &format!("{v:.3}"), 2, AXIS);
    }
    c.line((left, top), (left, bottom), AXIS);
    c.line((left, bottom), (right, bottom), AXIS);
    c.text(left, bottom + 10, "1", 2, AXIS);
    let last = format!("{}", max_x as u64);
    c.text(right - 12 * last.len() as i64, bottom + 10, &last, 2, AXIS);
    c.text((left + right) / 2 - 30, bottom + 28, "EPOCH", 2, AXIS);
    for (colour, pts) in series {
        for pair in pts.windows(2) {
            c.line(
                (px(pair[0].0), py(pair[0].1)),
                (px(pair[1].0), py(pair[1].1)),
                *colour,
            );
        }
        if let [only] = pts.as_slice() {
            c.line(
                (px(only.0) - 2, py(only.1)),
                (px(only.0) + 2, py(only.1)),
                *colour,
            );
        }
    }
}

/// Draw the loss and accuracy curves of a job's history.
pub fn curves(history: &[kiln_proto::kiln::v1::EpochMetrics]) -> Canvas {
    let mut c = Canvas::new(1200, 520);
    let collect =
        |f: &dyn Fn(&kiln_proto::kiln::v1::EpochMetrics) -> Option<f64>| -> Vec<(f64, f64)> {
            history
                .iter()
                .filter_map(|m| f(m).map(|v| (f64::from(m.epoch), v)))
                .collect()
        };
    panel(
        &mut c,
        (0, 0, 600, 480),
        "LOSS",
        &[
            (TRAIN, collect(&|m| Some(m.train_loss))),
            (VALIDATION, collect(&|m| m.validation_loss)),
        ],
    );
    panel(
        &mut c,
        (600, 0, 600, 480),
        "ACCURACY",
        &[
            (TRAIN, collect(&|m| m.train_accuracy)),
            (VALIDATION, collect(&|m| m.validation_accuracy)),
        ],
    );
    // Legend.
    for (i, (colour, label)) in [(TRAIN, "TRAIN"), (VALIDATION, "VALIDATION")]
        .into_iter()
        .enumerate()
    {
        let x = 400 + i as i64 * 260;
        for dy in 0..4 {
            c.line((x, 498 + dy), (x + 40, 498 + dy), colour);
        }
        c.text(x + 50, 493, label, 2, AXIS);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_checksums_match_their_definitions() {
        // Known values: CRC-32 of "IEND" and Adler-32 of "Wikipedia".
        assert_eq!(crc32(b"IEND"), 0xae42_6082);
        assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
    }

    #[test]
    fn a_curve_is_drawn_into_a_valid_png() {
        let history: Vec<_> = (1..=10)
            .map(|e| kiln_proto::kiln::v1::EpochMetrics {
                epoch: e,
                train_loss: 1.0 / f64::from(e),
                train_accuracy: Some(0.5 + f64::from(e) / 25.0),
                validation_loss: Some(1.1 / f64::from(e)),
                validation_accuracy: Some(0.5 + f64::from(e) / 30.0),
                ..Default::default()
            })
            .collect();
        let canvas = curves(&history);
        let coloured = |c: [u8; 3]| canvas.pixels.chunks(3).filter(|p| *p == c).count();
        assert!(coloured(TRAIN) > 500 && coloured(VALIDATION) > 500);
        let png = canvas.png();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 1200);
    }
}
