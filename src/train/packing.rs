//! `train --packing`: short rows share sequences of up to `cap` tokens
//! (greedy first-fit in the epoch's shuffled order), as TRL's padding-free
//! packing does. Each row keeps its own loss mask and attends only to
//! itself at its own positions (`Batch::starts`, `model::packing`), so a
//! packed step has the loss and gradients of the same rows unpacked: the
//! trainer's loss is the mean over the step's target tokens either way.

use crate::train::data::{Batch, Dataset, Example, IGNORE};

/// Greedy first-fit: each length in order goes to the first sequence with
/// room for it, else opens one. Returns the indices of each sequence's rows
/// in order. A length over `cap` gets a sequence of its own.
pub fn first_fit(lens: &[usize], cap: usize) -> Vec<Vec<usize>> {
    let mut seqs: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, &n) in lens.iter().enumerate() {
        match seqs.iter_mut().find(|(used, _)| used + n <= cap) {
            Some((used, rows)) => {
                *used += n;
                rows.push(i);
            }
            None => seqs.push((n, vec![i])),
        }
    }
    seqs.into_iter().map(|(_, rows)| rows).collect()
}

/// One batch of packed sequences, each the concatenation of its rows, padded
/// to the longest. No target crosses a row boundary (a row's last token
/// predicts nothing), and `starts` gives every token its row's first index
/// (padding after the rows is a row of its own).
pub fn packed_batch(seqs: &[Vec<&Example>], pad_id: u32) -> Batch {
    let merged: Vec<Example> = seqs
        .iter()
        .map(|rows| {
            let mut m = Example {
                ids: Vec::new(),
                labels: Vec::new(),
            };
            for (k, e) in rows.iter().enumerate() {
                m.ids.extend(&e.ids);
                m.labels.extend(&e.labels);
                // The previous row's last token must not predict this one.
                if k > 0 && !e.labels.is_empty() {
                    let at = m.labels.len() - e.labels.len();
                    m.labels[at] = IGNORE;
                }
            }
            m
        })
        .collect();
    let mut batch = Batch::from_examples(&merged.iter().collect::<Vec<_>>(), pad_id);
    let t = batch.t;
    let mut starts = Vec::with_capacity(batch.b * t);
    for rows in seqs {
        let mut at = 0;
        for e in rows {
            starts.extend(std::iter::repeat_n(at as u32, e.ids.len()));
            at += e.ids.len();
        }
        starts.extend(std::iter::repeat_n(at as u32, t - at));
    }
    batch.starts = starts;
    batch
}

/// The packed sequences of `epoch` (row indices), first-fit in its order.
pub fn epoch_sequences(data: &Dataset, epoch: usize, seed: u64, cap: usize) -> Vec<Vec<usize>> {
    let order = data.epoch_order(epoch, seed);
    let lens: Vec<usize> = order.iter().map(|&i| data.examples[i].ids.len()).collect();
    first_fit(&lens, cap)
        .into_iter()
        .map(|seq| seq.into_iter().map(|j| order[j]).collect())
        .collect()
}

/// The batches of `epoch`: `batch_size` packed sequences each.
pub fn packed_batches(
    data: &Dataset,
    batch_size: usize,
    epoch: usize,
    seed: u64,
    cap: usize,
) -> Vec<Batch> {
    let seqs = epoch_sequences(data, epoch, seed, cap);
    seqs.chunks(batch_size.max(1))
        .map(|chunk| {
            let rows: Vec<Vec<&Example>> = chunk
                .iter()
                .map(|s| s.iter().map(|&i| &data.examples[i]).collect())
                .collect();
            packed_batch(&rows, data.pad_id)
        })
        .collect()
}

/// What packing does to one epoch: rows, sequences (batch rows), and the
/// padding tokens of its batches unpacked and packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackStats {
    pub rows: usize,
    pub sequences: usize,
    pub batches_before: usize,
    pub batches_after: usize,
    pub padded_before: usize,
    pub padded_after: usize,
}

/// [`PackStats`] of `epoch` with `batch_size` rows (sequences) per batch.
pub fn stats(data: &Dataset, batch_size: usize, epoch: usize, seed: u64, cap: usize) -> PackStats {
    let padding = |bs: &[Batch]| -> usize {
        bs.iter()
            .map(|b| b.b * b.t - b.lens.iter().sum::<usize>())
            .sum()
    };
    let before = data.batches(batch_size, epoch, seed);
    let after = packed_batches(data, batch_size, epoch, seed, cap);
    PackStats {
        rows: data.len(),
        sequences: after.iter().map(|b| b.b).sum(),
        batches_before: before.len(),
        batches_after: after.len(),
        padded_before: padding(&before),
        padded_after: padding(&after),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32], labels: &[i32]) -> Example {
        Example {
            ids: ids.to_vec(),
            labels: labels.to_vec(),
        }
    }

    #[test]
    fn first_fit_fills_earlier_sequences() {
        assert_eq!(
            first_fit(&[5, 4, 3, 1, 6], 8),
            vec![vec![0, 2], vec![1, 3], vec![4]]
        );
        assert_eq!(first_fit(&[9, 2], 8), vec![vec![0], vec![1]]);
    }

    #[test]
    fn packed_batch_keeps_targets_inside_rows() {
        let a = ex(&[1, 2, 3], &[1, 2, 3]);
        let b = ex(&[4, 5], &[4, 5]);
        let c = ex(&[6], &[6]);
        let bt = packed_batch(&[vec![&a, &b], vec![&c]], 0);
        assert_eq!((bt.b, bt.t), (2, 5));
        assert_eq!(bt.ids, vec![1, 2, 3, 4, 5, 6, 0, 0, 0, 0]);
        // Token 3 (a's last) predicts nothing, not b's first token.
        assert_eq!(
            bt.targets,
            vec![2, 3, IGNORE, 5, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]
        );
        assert_eq!(bt.n_targets, a.n_targets() + b.n_targets() + c.n_targets());
        assert_eq!(bt.starts, vec![0, 0, 0, 3, 3, 0, 1, 1, 1, 1]);
        assert_eq!(bt.lens, vec![5, 1]);
    }
}
