//! Medians and the side-by-side table every subcommand prints.

/// The median of `values` (the mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// A least-squares line `y = a + b * x` and how well it fits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    /// The intercept: `y` at `x = 0`.
    pub a: f64,
    /// The slope.
    pub b: f64,
    /// The coefficient of determination, 1 - SS_res / SS_tot (1 when every point is on the
    /// line; NaN when every `y` is the same).
    pub r2: f64,
}

/// The least-squares line through `points` (x, y), non-finite points left out; `None` with
/// fewer than two distinct `x`.
pub fn linear_fit(points: &[(f64, f64)]) -> Option<Fit> {
    let p: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let n = p.len() as f64;
    let mx = p.iter().map(|(x, _)| x).sum::<f64>() / n;
    let my = p.iter().map(|(_, y)| y).sum::<f64>() / n;
    let sxx: f64 = p.iter().map(|(x, _)| (x - mx).powi(2)).sum();
    let sxy: f64 = p.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    if p.len() < 2 || sxx <= f64::EPSILON * mx.abs().max(1.0) {
        return None;
    }
    let b = sxy / sxx;
    let a = my - b * mx;
    let ss_res: f64 = p.iter().map(|(x, y)| (y - a - b * x).powi(2)).sum();
    let ss_tot: f64 = p.iter().map(|(_, y)| (y - my).powi(2)).sum();
    Some(Fit {
        a,
        b,
        r2: 1.0 - ss_res / ss_tot,
    })
}

/// A plain-text table with right-aligned columns after the first.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|s| (*s).to_owned()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let width: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for (i, row) in self.rows.iter().enumerate() {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c == 0 {
                    line.push_str(&format!("{cell:<w$}", w = width[c]));
                } else {
                    line.push_str(&format!("  {cell:>w$}", w = width[c]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
            if i == 0 {
                out.push_str(&"-".repeat(width.iter().sum::<usize>() + 2 * cols.saturating_sub(1)));
                out.push('\n');
            }
        }
        out
    }
}

/// Formats `x` with `digits` decimals, or "-" when it is not a number.
pub fn num(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        "-".to_owned()
    }
}

/// Parses a size such as 2GiB, 512M, 1073741824 (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("not a size: {s:?} (try 2GiB or 512M)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        other => return Err(format!("unknown size unit {other:?} (use K, M or G)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size too large: {s}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn fits() {
        let fit = linear_fit(&[(1.0, 3.0), (2.0, 5.0), (4.0, 9.0)]).expect("a line");
        assert!((fit.a - 1.0).abs() < 1e-12 && (fit.b - 2.0).abs() < 1e-12);
        assert!((fit.r2 - 1.0).abs() < 1e-12);
        // Symmetric noise around y = x: the slope stays, R^2 drops below 1.
        let fit = linear_fit(&[(0.0, 0.5), (0.0, -0.5), (2.0, 2.5), (2.0, 1.5)]).expect("a line");
        assert!((fit.a - 0.0).abs() < 1e-12 && (fit.b - 1.0).abs() < 1e-12);
        assert!((fit.r2 - 0.8).abs() < 1e-12, "{}", fit.r2);
        assert_eq!(linear_fit(&[(1.0, 1.0), (1.0, 2.0)]), None);
        assert_eq!(linear_fit(&[(1.0, 1.0)]), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("7"), Ok(7));
        assert!(parse_size("1T").is_err());
        assert!(parse_size("G").is_err());
    }
}
