//! `layerstore-gc`: a generic mark-and-sweep engine over any reference graph.
//!
//! The engine knows nothing about OCI, databases or files. A caller supplies a [`Graph`]
//! (how to list a node's children), the roots, the set of all nodes, and a [`Sweeper`]
//! that deletes. [`plan`] marks everything reachable from the roots in parallel (rayon,
//! frontier by frontier) and returns a [`GcPlan`]: the unreachable candidates and
//! statistics — a dry run is just printing it. [`execute`] hands exactly the plan's
//! candidates to the sweeper, in batches, and follows up on the nodes the sweeper reports
//! as newly orphaned, so one run frees a dead subgraph completely.
//!
//! Safety against concurrent writers is the sweeper's business, and the reason for the
//! split: the mark runs on a snapshot, so a node that became referenced after it may be a
//! candidate; the sweeper must re-check each candidate at deletion time (in the store:
//! inside the write transaction) and skip it if it is live. The engine never deletes
//! anything itself.
//!
//! Every long step takes an interrupt flag and reports progress.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// A reference graph.
pub trait Graph: Sync {
    /// A node id (cheap to copy).
    type Node: Copy + Eq + Hash + Ord + Send + Sync;
    /// What listing children can fail with.
    type Error: Send;

    /// Appends the children of `node` to `out`.
    fn children(&self, node: &Self::Node, out: &mut Vec<Self::Node>) -> Result<(), Self::Error>;
}

/// Deletes candidates.
pub trait Sweeper<N> {
    /// What a sweep can fail with.
    type Error;

    /// Deletes what it still may of `batch` (re-checking each node), and returns the nodes
    /// it deleted plus children of them that may have become garbage (to be considered
    /// in the next round; reporting a child that still has other parents is harmless).
    fn sweep(&mut self, batch: &[N]) -> Result<Swept<N>, Self::Error>;
}

/// What one [`Sweeper::sweep`] call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swept<N> {
    /// Nodes deleted.
    pub deleted: Vec<N>,
    /// Nodes the sweeper kept because its re-check found them live.
    pub kept: Vec<N>,
    /// Children of the deleted nodes, which may now be garbage (offered again, in the next
    /// round, if they were candidates).
    pub orphaned: Vec<N>,
    /// Nodes of the batch the sweeper did not get to (it bounds its time per call); they
    /// are offered again first.
    pub deferred: Vec<N>,
}

impl<N> Default for Swept<N> {
    fn default() -> Self {
        Swept {
            deleted: Vec::new(),
            kept: Vec::new(),
            orphaned: Vec::new(),
            deferred: Vec::new(),
        }
    }
}

/// Progress reports: called from the thread running the step.
pub trait Progress: Sync {
    /// `phase` advanced to `done` (of `total`, when known).
    fn report(&self, phase: &'static str, done: u64, total: Option<u64>);
}

/// A progress sink that ignores everything.
pub struct NoProgress;

impl Progress for NoProgress {
    fn report(&self, _: &'static str, _: u64, _: Option<u64>) {}
}

/// Choices for [`plan`] and [`execute`].
pub struct Options<'a> {
    /// Set to stop a long step early (it then returns [`Error::Interrupted`]).
    pub interrupt: &'a AtomicBool,
    /// Where progress goes.
    pub progress: &'a dyn Progress,
    /// Candidates per [`Sweeper::sweep`] call (bounded, so a sweep never holds a long
    /// write transaction). Default 1024.
    pub batch: usize,
}

impl<'a> Options<'a> {
    /// Options with the given interrupt flag, no progress, batches of 1024.
    pub fn new(interrupt: &'a AtomicBool) -> Options<'a> {
        Options {
            interrupt,
            progress: &NoProgress,
            batch: 1024,
        }
    }
}

/// Why a collection stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error<E> {
    /// The interrupt flag was set.
    Interrupted,
    /// The graph or the sweeper failed.
    Graph(E),
    /// The sweeper deferred a whole batch without looking at any node.
    Stalled,
}

impl<E: std::fmt::Display> std::fmt::Display for Error<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Interrupted => f.write_str("interrupted"),
            Error::Stalled => f.write_str("the sweeper made no progress"),
            Error::Graph(e) => e.fmt(f),
        }
    }
}

impl<E: std::fmt::Debug + std::fmt::Display> std::error::Error for Error<E> {}

/// The result of the mark: what a sweep will be offered.
#[derive(Debug, Clone)]
pub struct GcPlan<N> {
    /// Nodes reachable from the roots.
    pub marked: usize,
    /// Roots given (after deduplication).
    pub roots: usize,
    /// Nodes considered.
    pub total: usize,
    /// Unreachable nodes, in the order given by the caller's node list.
    pub candidates: Vec<N>,
    /// The candidates no other candidate names (same order): [`execute`] offers these
    /// first, and each other candidate only once a deletion has orphaned it, so a child is
    /// offered once, after its parents, instead of again and again while they stand.
    pub first: Vec<N>,
    /// Time spent marking.
    pub mark_time: Duration,
}

/// Marks everything reachable from `roots` (in parallel, frontier by frontier).
pub fn mark<G: Graph>(
    graph: &G,
    roots: impl IntoIterator<Item = G::Node>,
    opts: &Options<'_>,
) -> Result<HashSet<G::Node>, Error<G::Error>> {
    let mut marked: HashSet<G::Node> = HashSet::new();
    let mut frontier: Vec<G::Node> = roots.into_iter().filter(|r| marked.insert(*r)).collect();
    while !frontier.is_empty() {
        if opts.interrupt.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        let mut next = children_of(graph, &frontier, |_| true)?;
        next.par_sort_unstable();
        next.dedup();
        next.retain(|n| marked.insert(*n));
        opts.progress.report("mark", marked.len() as u64, None);
        frontier = next;
    }
    Ok(marked)
}

/// Marks from `roots` and lists every node of `all` that was not reached.
pub fn plan<G: Graph>(
    graph: &G,
    roots: impl IntoIterator<Item = G::Node>,
    all: impl IntoIterator<Item = G::Node>,
    opts: &Options<'_>,
) -> Result<GcPlan<G::Node>, Error<G::Error>> {
    let start = Instant::now();
    let roots: Vec<G::Node> = roots.into_iter().collect();
    let n_roots = roots.iter().collect::<HashSet<_>>().len();
    let marked = mark(graph, roots, opts)?;
    let mut total = 0;
    let candidates: Vec<G::Node> = all
        .into_iter()
        .inspect(|_| total += 1)
        .filter(|n| !marked.contains(n))
        .collect();
    let n_marked = marked.len();
    drop(marked);
    let first = sources(graph, &candidates)?;
    Ok(GcPlan {
        marked: n_marked,
        roots: n_roots,
        total,
        candidates,
        first,
        mark_time: start.elapsed(),
    })
}

/// The children of `nodes` that `keep` accepts (with repeats), listed in parallel.
fn children_of<G: Graph>(
    graph: &G,
    nodes: &[G::Node],
    keep: impl Fn(&G::Node) -> bool + Sync,
) -> Result<Vec<G::Node>, Error<G::Error>> {
    Ok(nodes
        .par_chunks(256)
        .map(|chunk| {
            let mut out = Vec::new();
            for n in chunk {
                graph.children(n, &mut out)?;
            }
            out.retain(&keep);
            Ok(out)
        })
        .collect::<Result<Vec<Vec<G::Node>>, G::Error>>()
        .map_err(Error::Graph)?
        .into_iter()
        .flatten()
        .collect())
}

/// The members of `nodes` that no member of `nodes` names, in their order.
fn sources<G: Graph>(graph: &G, nodes: &[G::Node]) -> Result<Vec<G::Node>, Error<G::Error>> {
    let set: HashSet<G::Node> = nodes.iter().copied().collect();
    let named: HashSet<G::Node> = children_of(graph, nodes, |c| set.contains(c))?
        .into_iter()
        .collect();
    Ok(nodes
        .iter()
        .filter(|n| !named.contains(n))
        .copied()
        .collect())
}

/// What [`execute`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome<N> {
    /// Nodes deleted, in deletion order.
    pub deleted: Vec<N>,
    /// Candidates the sweeper kept (live at re-check).
    pub kept: Vec<N>,
    /// Number of [`Sweeper::sweep`] calls.
    pub sweeps: usize,
}

/// Offers the plan's `first` candidates to the sweeper in batches, then the nodes it
/// reports as orphaned (only those that were candidates: a marked node is live), until
/// nothing is left. A node is orphaned when a parent of it is deleted, and each parent is
/// deleted once, so the run terminates. A candidate whose candidate parent the re-check
/// keeps is never offered: it is live through that parent.
///
/// Offers go in rounds, each in node order: first `first` (in the order the plan lists
/// them; [`plan`] keeps the order of `all`), then, sorted, the nodes orphaned during the
/// previous round. A sweeper whose storage is ordered by node (a B-tree keyed by it)
/// therefore sees batches of neighbouring keys, and deferred nodes are offered again
/// first, so that order holds.
pub fn execute<N, S>(
    plan: &GcPlan<N>,
    sweeper: &mut S,
    opts: &Options<'_>,
) -> Result<Outcome<N>, Error<S::Error>>
where
    N: Copy + Eq + Hash + Ord,
    S: Sweeper<N>,
{
    let candidates: HashSet<N> = plan.candidates.iter().copied().collect();
    let mut deleted_set: HashSet<N> = HashSet::new();
    let mut out = Outcome {
        deleted: Vec::new(),
        kept: Vec::new(),
        sweeps: 0,
    };
    let mut queue: std::collections::VecDeque<N> = plan.first.iter().copied().collect();
    let mut next_round: Vec<N> = Vec::new();
    let total = plan.candidates.len() as u64;
    let mut kept: HashSet<N> = HashSet::new();
    loop {
        if queue.is_empty() {
            if next_round.is_empty() {
                break;
            }
            next_round.sort_unstable();
            next_round.dedup();
            next_round.retain(|n| !deleted_set.contains(n));
            queue.extend(next_round.drain(..));
            continue;
        }
        if opts.interrupt.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        let n = opts.batch.max(1).min(queue.len());
        let batch: Vec<N> = queue.drain(..n).collect();
        let swept = sweeper.sweep(&batch).map_err(Error::Graph)?;
        out.sweeps += 1;
        for d in swept.deleted {
            if deleted_set.insert(d) {
                kept.remove(&d);
                out.deleted.push(d);
            }
        }
        for k in swept.kept {
            if !deleted_set.contains(&k) {
                kept.insert(k);
            }
        }
        for o in swept.orphaned {
            if candidates.contains(&o) && !deleted_set.contains(&o) {
                next_round.push(o);
            }
        }
        if !swept.deferred.is_empty() && swept.deferred.len() == batch.len() {
            // No progress at all: the sweeper must always get through one node.
            return Err(Error::Stalled);
        }
        for d in swept.deferred.into_iter().rev() {
            queue.push_front(d);
        }
        opts.progress
            .report("sweep", out.deleted.len() as u64, Some(total));
    }
    let mut kept: Vec<N> = kept.into_iter().collect();
    kept.retain(|k| !deleted_set.contains(k));
    out.kept = kept;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// A graph in memory, with reference counts kept the way a store keeps them.
    #[derive(Default, Clone)]
    struct Mem {
        edges: BTreeMap<u32, BTreeSet<u32>>,
        nodes: BTreeSet<u32>,
        pinned: BTreeSet<u32>,
    }

    impl Graph for Mem {
        type Node = u32;
        type Error = String;
        fn children(&self, n: &u32, out: &mut Vec<u32>) -> Result<(), String> {
            out.extend(self.edges.get(n).into_iter().flatten().copied());
            Ok(())
        }
    }

    impl Mem {
        fn refcount(&self, n: u32) -> usize {
            self.edges
                .iter()
                .filter(|(p, cs)| self.nodes.contains(p) && cs.contains(&n))
                .count()
        }
    }

    /// Deletes a node only when nothing stored points at it and it is not pinned — the
    /// re-check a real store does in its write transaction.
    impl Sweeper<u32> for Mem {
        type Error = String;
        fn sweep(&mut self, batch: &[u32]) -> Result<Swept<u32>, String> {
            let mut s = Swept::default();
            for &n in batch {
                if self.pinned.contains(&n) || self.refcount(n) > 0 || !self.nodes.contains(&n) {
                    s.kept.push(n);
                    continue;
                }
                self.nodes.remove(&n);
                s.deleted.push(n);
                for c in self.edges.remove(&n).unwrap_or_default() {
                    if self.refcount(c) == 0 {
                        s.orphaned.push(c);
                    }
                }
            }
            Ok(s)
        }
    }

    fn reachable(g: &Mem, roots: &[u32]) -> BTreeSet<u32> {
        let mut seen = BTreeSet::new();
        let mut stack = roots.to_vec();
        while let Some(n) = stack.pop() {
            if seen.insert(n) {
                stack.extend(g.edges.get(&n).into_iter().flatten());
            }
        }
        seen
    }

    #[test]
    fn chain_is_freed_in_one_run_whatever_the_order() {
        // 0 -> 1 -> 2 -> 3, nothing roots it; candidates offered children first.
        let mut g = Mem::default();
        for i in 0..4 {
            g.nodes.insert(i);
        }
        for i in 0..3 {
            g.edges.entry(i).or_default().insert(i + 1);
        }
        let stop = AtomicBool::new(false);
        let mut opts = Options::new(&stop);
        opts.batch = 1;
        let p = plan(&g, [], [3, 2, 1, 0], &opts).unwrap();
        assert_eq!(p.candidates, vec![3, 2, 1, 0]);
        let out = execute(&p, &mut g, &opts).unwrap();
        assert_eq!(out.deleted.len(), 4);
        assert!(g.nodes.is_empty());
        assert!(out.kept.is_empty());
    }

    /// Records every batch it is offered (and defers the second half of the first one).
    struct Recorder {
        g: Mem,
        batches: Vec<Vec<u32>>,
        deferred_once: bool,
    }

    impl Sweeper<u32> for Recorder {
        type Error = String;
        fn sweep(&mut self, batch: &[u32]) -> Result<Swept<u32>, String> {
            self.batches.push(batch.to_vec());
            let (now, later) = if self.deferred_once {
                (batch, &[][..])
            } else {
                self.deferred_once = true;
                batch.split_at(batch.len().div_ceil(2))
            };
            let mut s = self.g.sweep(now)?;
            s.deferred = later.to_vec();
            Ok(s)
        }
    }

    #[test]
    fn parents_are_offered_first_children_in_sorted_rounds_deferred_first() {
        // 10 and 20 name 1..=4 (3 twice); 30 names 20. Nothing is a root.
        let mut g = Mem::default();
        g.nodes.extend([1, 2, 3, 4, 10, 20, 30]);
        g.edges.entry(10).or_default().extend([4, 3]);
        g.edges.entry(20).or_default().extend([3, 2, 1]);
        g.edges.entry(30).or_default().insert(20);
        let stop = AtomicBool::new(false);
        let mut opts = Options::new(&stop);
        opts.batch = 2;
        let p = plan(&g, [], [1, 2, 3, 4, 10, 20, 30], &opts).unwrap();
        assert_eq!(p.first, vec![10, 30], "only what no candidate names");
        let mut r = Recorder {
            g,
            batches: Vec::new(),
            deferred_once: false,
        };
        let out = execute(&p, &mut r, &opts).unwrap();
        assert_eq!(out.deleted.len(), 7);
        assert!(r.g.nodes.is_empty());
        // [10, 30] with 30 deferred, then 30 again before anything else; then, sorted, the
        // orphans of round 1 (4 from 10 — 3 still has 20 —, 20 from 30); then 20's.
        assert_eq!(
            r.batches,
            vec![vec![10, 30], vec![30], vec![4, 20], vec![1, 2], vec![3]]
        );
    }

    #[test]
    fn interrupt_stops_mark_and_sweep() {
        let mut g = Mem::default();
        g.nodes.extend([1, 2]);
        g.edges.entry(1).or_default().insert(2);
        let stop = AtomicBool::new(true);
        let opts = Options::new(&stop);
        assert_eq!(
            plan(&g, [1], [1, 2], &opts).unwrap_err(),
            Error::Interrupted
        );
        let p = GcPlan {
            marked: 0,
            roots: 0,
            total: 2,
            candidates: vec![1, 2],
            first: vec![1],
            mark_time: Duration::ZERO,
        };
        assert_eq!(execute(&p, &mut g, &opts).unwrap_err(), Error::Interrupted);
        assert_eq!(g.nodes.len(), 2, "nothing swept after the interrupt");
    }

    #[test]
    fn a_node_pinned_after_the_mark_survives() {
        // The mark saw 5 as garbage; a writer pinned it before the sweep: the re-check wins.
        let mut g = Mem::default();
        g.nodes.extend([5, 6]);
        g.edges.entry(5).or_default().insert(6);
        let stop = AtomicBool::new(false);
        let opts = Options::new(&stop);
        let p = plan(&g, [], [5, 6], &opts).unwrap();
        g.pinned.insert(5);
        let out = execute(&p, &mut g, &opts).unwrap();
        assert!(out.deleted.is_empty());
        assert_eq!(g.nodes.len(), 2);
    }

    proptest::proptest! {
        /// On random DAGs, exactly the nodes unreachable from the roots disappear.
        #[test]
        fn frees_exactly_the_unreachable(
            n in 1u32..60,
            edges in proptest::collection::vec((0u32..60, 0u32..60), 0..150),
            roots in proptest::collection::vec(0u32..60, 0..6),
            batch in 1usize..8,
        ) {
            let mut g = Mem::default();
            g.nodes.extend(0..n);
            for (a, b) in edges {
                // Parents have lower ids: a DAG, like manifests over layers.
                let (a, b) = (a % n, b % n);
                if a < b {
                    g.edges.entry(a).or_default().insert(b);
                }
            }
            let roots: Vec<u32> = roots.into_iter().map(|r| r % n).collect();
            let live = reachable(&g, &roots);
            let stop = AtomicBool::new(false);
            let mut opts = Options::new(&stop);
            opts.batch = batch;
            // Offer candidates in an adversarial order: children before parents.
            let p = plan(&g, roots.clone(), (0..n).rev(), &opts).unwrap();
            proptest::prop_assert_eq!(p.marked, live.len());
            let out = execute(&p, &mut g, &opts).unwrap();
            proptest::prop_assert_eq!(&g.nodes, &live);
            proptest::prop_assert_eq!(out.deleted.len() as u32, n - live.len() as u32);
        }
    }
}
