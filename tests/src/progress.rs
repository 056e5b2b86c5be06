//! Progress lines shared by `cargo xtask` and the demo: `==> step`, then how long it took.

use std::time::{Duration, Instant};

/// Prints `==> title`, runs `f`, then `    done in 1.2s` or `    failed after 1.2s`.
pub fn step<T, E>(title: &str, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    println!("==> {title}");
    let started = Instant::now();
    let result = f();
    let verdict = if result.is_ok() {
        "done in"
    } else {
        "failed after"
    };
    println!("    {verdict} {}", format_duration(started.elapsed()));
    result
}

/// `0.42s`, `12.3s`, `4m05s`.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 10.0 {
        format!("{secs:.2}s")
    } else if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_duration(Duration::from_millis(420)), "0.42s");
        assert_eq!(format_duration(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(format_duration(Duration::from_secs(245)), "4m05s");
    }

    #[test]
    fn step_passes_the_result_through() {
        assert_eq!(step("ok", || Ok::<_, ()>(7)), Ok(7));
        assert_eq!(step("fails", || Err::<(), _>("no")), Err("no"));
    }
}
