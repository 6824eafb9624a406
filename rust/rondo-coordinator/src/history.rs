//! The round history as CSV (`GET /v1/history.csv`): one row per closed round attempt, for a
//! spreadsheet or a plotting script. `close_reason` is the code of why it closed,
//! `missed_deadline` the ids of who missed the deadline, separated by spaces (the first
//! `SUMMARY_MISSED_LISTED`), and `missed_deadline_unlisted` how many more did.

use std::collections::BTreeSet;

use rondo_core::federation::{Outcome, RoundSummary};

/// Fixed columns first, then `train_<name>` for every training metric and `eval_<name>` for
/// every evaluation metric any row has (sorted); a cell a row lacks is empty.
pub fn csv(rows: &[RoundSummary]) -> String {
    let train: BTreeSet<&str> = rows
        .iter()
        .flat_map(|r| r.training_metrics.keys().map(String::as_str))
        .collect();
    let eval: BTreeSet<&str> = rows
        .iter()
        .filter_map(|r| r.evaluation.as_ref())
        .flat_map(|e| e.metrics.keys().map(String::as_str))
        .collect();
    let mut writer = csv::Writer::from_writer(Vec::new());
    let mut header: Vec<String> = [
        "round",
        "attempt",
        "outcome",
        "reason",
        "close_reason",
        "duration_secs",
        "selected",
        "delivered",
        "missed_deadline",
        "missed_deadline_unlisted",
        "total_samples",
        "eval_participants",
        "eval_n_samples",
        "eval_loss",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    header.extend(train.iter().map(|name| format!("train_{name}")));
    header.extend(eval.iter().map(|name| format!("eval_{name}")));
    let number = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    // Writing into a Vec cannot fail: the results are ignored on purpose.
    let _ = writer.write_record(&header);
    for row in rows {
        let evaluation = row.evaluation.as_ref();
        let mut record = vec![
            row.round.to_string(),
            row.attempt.to_string(),
            match row.outcome {
                Some(Outcome::Aggregated) => "aggregated".into(),
                Some(Outcome::Failed) => "failed".into(),
                None => String::new(),
            },
            row.reason.clone().unwrap_or_default(),
            row.close_reason
                .map(|c| c.as_str().to_string())
                .unwrap_or_default(),
            number(row.duration_secs),
            row.selected.to_string(),
            row.delivered.to_string(),
            // Ids hold no spaces (the coordinator makes them: UUIDs).
            row.missed_deadline.join(" "),
            row.missed_deadline_unlisted.to_string(),
            row.total_samples.to_string(),
            evaluation
                .map(|e| e.participants.to_string())
                .unwrap_or_default(),
            evaluation
                .map(|e| e.n_samples.to_string())
                .unwrap_or_default(),
            number(evaluation.map(|e| e.loss)),
        ];
        record.extend(
            train
                .iter()
                .map(|n| number(row.training_metrics.get(*n).copied())),
        );
        record.extend(
            eval.iter()
                .map(|n| number(evaluation.and_then(|e| e.metrics.get(*n).copied()))),
        );
        let _ = writer.write_record(&record);
    }
    let bytes = writer.into_inner().unwrap_or_default();
    String::from_utf8(bytes).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rondo_core::federation::{CloseReason, EvaluationSummary};
    use std::collections::BTreeMap;

    #[test]
    fn every_metric_gets_a_column_and_text_is_quoted() {
        let row = |round, reason: &str, train: &[(&str, f64)], eval: Option<f64>| RoundSummary {
            round,
            attempt: 0,
            outcome: Some(Outcome::Aggregated),
            close_reason: Some(CloseReason::TrainingDeadline),
            reason: Some(reason.into()),
            duration_secs: Some(1.5),
            selected: 2,
            delivered: 2,
            missed_deadline: vec!["p3".into(), "p4".into()],
            missed_deadline_unlisted: round as usize,
            total_samples: 30,
            training_metrics: train.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            evaluation: eval.map(|loss| EvaluationSummary {
                participants: 2,
                asked: 2,
                n_samples: 40,
                loss,
                metrics: BTreeMap::from([("mae".to_string(), 0.25)]),
            }),
        };
        let text = csv(&[
            row(1, "all 2 delivered", &[("loss", 2.0)], None),
            row(2, "a \"quoted\", reason", &[("acc", 0.5)], Some(0.75)),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "round,attempt,outcome,reason,close_reason,duration_secs,selected,delivered,\
             missed_deadline,missed_deadline_unlisted,total_samples,eval_participants,eval_n_samples,eval_loss,train_acc,\
             train_loss,eval_mae"
        );
        assert_eq!(
            lines[1],
            "1,0,aggregated,all 2 delivered,training_deadline,1.5,2,2,p3 p4,1,30,,,,,2,"
        );
        assert_eq!(
            lines[2],
            "2,0,aggregated,\"a \"\"quoted\"\", reason\",training_deadline,1.5,2,2,p3 p4,2,30,2,\
             40,0.75,0.5,,0.25"
        );
    }
}
