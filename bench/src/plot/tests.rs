//! The plots against the committed points: every CSV in bench/plots reads back, redraws, and
//! writes the same CSV again; bad CSVs are refused with the line at fault.
use super::*;
use crate::PLOTS;

/// The committed CSV of `spec`.
fn committed(spec: &Spec) -> String {
    let path = format!("{}/plots/{}.csv", env!("CARGO_MANIFEST_DIR"), spec.name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn committed_points_redraw() {
    for spec in PLOTS {
        let series = parse(spec, &committed(spec)).unwrap();
        assert!(!series.is_empty(), "{}: no series", spec.name);
        let svg = render(spec, &series).unwrap();
        assert!(svg.starts_with("<svg"), "{}", spec.name);
        assert!(svg.trim_end().ends_with("</svg>"), "{}", spec.name);
        assert!(svg.contains(spec.title), "{}: title missing", spec.name);
        for s in &series {
            assert!(svg.contains(&s.name), "{}: legend lacks {}", spec.name, s.name);
        }
        let finite = series.iter().flat_map(|s| &s.points).filter(|p| p.1.is_finite()).count();
        match spec.layout {
            // One marker per measured point.
            Layout::Lines { .. } => assert_eq!(svg.matches("<circle").count(), finite),
            // One rectangle per bar, one per legend swatch, and the background.
            Layout::Bars { .. } => {
                assert_eq!(svg.matches("<rect").count(), finite + series.len() + 1)
            }
        }
    }
}

#[test]
fn committed_points_round_trip() {
    for spec in PLOTS {
        let text = committed(spec);
        let series = parse(spec, &text).unwrap();
        let again = csv(spec, &series);
        match spec.layout {
            Layout::Lines { .. } => assert_eq!(again, text, "{}", spec.name),
            // Written before names were escaped: "lb L7 before (0c86086, hyper HTTP/1)".
            Layout::Bars { .. } => assert_eq!(again, text.replace(", hyper", "; hyper")),
        }
    }
}

#[test]
fn lines_with_gaps_round_trip() {
    let spec = &crate::micro::FLOWS;
    let series = vec![
        Series { name: "a, b".into(), points: vec![(10.0, 1.5), (1000.0, 2.0)] },
        Series { name: "c".into(), points: vec![(100.0, 3.25)] },
    ];
    let text = csv(spec, &series);
    assert_eq!(text, "tracked flows,a; b,c\n10,1.500,\n100,,3.250\n1000,2.000,\n");
    let back = parse(spec, &text).unwrap();
    assert_eq!(back[0], Series { name: "a; b".into(), points: series[0].points.clone() });
    assert_eq!(back[1], series[1]);
}

#[test]
fn bad_csv_is_refused_with_its_line() {
    let spec = &crate::micro::FLOWS;
    let err = |text: &str| format!("{:#}", parse(spec, text).unwrap_err());
    assert_eq!(err(""), "empty CSV");
    assert!(err("x,a\n1,2\n3\n").contains("line 3: 1 fields, the header has 2"));
    assert!(err("x,a\n1,fast\n").contains("line 2: \"fast\" is not a number"));
    let bars = &crate::l7::THROUGHPUT;
    assert!(format!("{:#}", parse(bars, "proxy\nlb,1,2\n").unwrap_err()).contains("line 2"));
    // A log axis cannot hold x = 0: an error, not a panic inside the drawing.
    let zero = [Series { name: "a".into(), points: vec![(0.0, 1.0)] }];
    assert!(render(spec, &zero).unwrap_err().to_string().contains("log axis"));
    assert!(render(spec, &[]).is_err());
}

#[test]
fn compact_numbers() {
    assert_eq!(compact(1500.0), "1.5k");
    assert_eq!(compact(1_000_000.0), "1M");
    assert_eq!(compact(0.25), "0.25");
    assert_eq!(compact(2500.0), "2.5k");
}

#[test]
fn nice_steps() {
    assert_eq!(nice(47_000.0), (10_000.0, 50_000.0));
    assert_eq!(nice(3.2), (1.0, 4.0));
}
