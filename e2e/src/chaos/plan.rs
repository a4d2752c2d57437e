//! The seeded decisions of a chaos run, with no I/O: a small deterministic random generator, and the schedule of
//! kills (which component, how long after the previous recovery, how long it stays down).

use std::time::Duration;

/// SplitMix64: a tiny, seedable, deterministic generator (the same seed gives the same run plan on every machine).
/// Not for anything secret.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// An independent generator for one part of the run (a client, a sender), so that the order in which tasks
    /// happen to draw does not change what each one gets.
    pub fn derive(seed: u64, stream: u64) -> Self {
        let mut mixer = Rng(seed ^ stream.wrapping_mul(0xA24B_AED4_963E_E407));
        Rng(mixer.next_u64())
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (0 when `bound` is 0).
    pub fn below(&mut self, bound: usize) -> usize {
        if bound == 0 {
            return 0;
        }
        (self.next_u64() % bound as u64) as usize
    }

    /// A fraction in `[0, 1)`.
    pub fn fraction(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A duration in `[low, high]`.
    pub fn between(&mut self, low: Duration, high: Duration) -> Duration {
        if high <= low {
            return low;
        }
        low + (high - low).mul_f64(self.fraction())
    }

    /// Shuffles `items` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for last in (1..items.len()).rev() {
            let other = self.below(last + 1);
            items.swap(last, other);
        }
    }
}

/// A component a chaos run kills and restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// One gateway process: SIGKILL, then started again on the same client port.
    Gateway,
    /// The router process: SIGKILL, then started again on the same port with the same data.
    Router,
    /// The Redis server: SIGKILL, then started again on the same port (empty: it keeps no data).
    Redis,
    /// The Kafka broker: a clean stop (SIGTERM, as `e2e/stack/down.sh` does), then started again.
    Kafka,
}

impl Fault {
    /// Every fault, in a fixed order.
    pub const ALL: [Fault; 4] = [Fault::Gateway, Fault::Router, Fault::Redis, Fault::Kafka];

    /// Its name in summaries and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Gateway => "gateway",
            Fault::Router => "router",
            Fault::Redis => "redis",
            Fault::Kafka => "kafka",
        }
    }

    /// Parses a name of [`Fault::name`].
    pub fn parse(name: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|fault| fault.name() == name.trim())
    }
}

/// One planned kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kill {
    /// What goes down.
    pub fault: Fault,
    /// Which gateway, for [`Fault::Gateway`] (0 otherwise).
    pub gateway: usize,
    /// The time between the previous kill's recovery (or the start of the load) and this kill.
    pub wait: Duration,
    /// How long the component stays down before it is started again.
    pub down_for: Duration,
    /// One of the first kills that together cover every fault once: the load goes on until these are done.
    pub mandatory: bool,
}

/// The spacing of kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacing {
    /// Shortest wait between a recovery and the next kill.
    pub min_wait: Duration,
    /// Longest wait.
    pub max_wait: Duration,
    /// Longest time a component stays down (the shortest is a tenth of it).
    pub max_down: Duration,
}

/// The kills of a run: first every fault of `faults` once, in a seeded order (mandatory), then `extra` more, each
/// a seeded choice among `faults`.
pub fn schedule(seed: u64, faults: &[Fault], gateways: usize, pacing: Pacing, extra: usize) -> Vec<Kill> {
    let mut rng = Rng::derive(seed, 1);
    let mut order: Vec<Fault> = faults.to_vec();
    order.sort_unstable();
    order.dedup();
    rng.shuffle(&mut order);
    let mandatory = order.len();
    for _ in 0..extra {
        if order.is_empty() {
            break;
        }
        let pick = faults[rng.below(faults.len())];
        order.push(pick);
    }
    order
        .into_iter()
        .enumerate()
        .map(|(index, fault)| Kill {
            fault,
            gateway: if fault == Fault::Gateway { rng.below(gateways) } else { 0 },
            wait: rng.between(pacing.min_wait, pacing.max_wait),
            down_for: rng.between(pacing.max_down / 10, pacing.max_down),
            mandatory: index < mandatory,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACING: Pacing =
        Pacing { min_wait: Duration::from_secs(2), max_wait: Duration::from_secs(6), max_down: Duration::from_secs(3) };

    #[test]
    fn the_same_seed_gives_the_same_plan_and_another_seed_another() {
        let first = schedule(7, &Fault::ALL, 2, PACING, 10);
        assert_eq!(first, schedule(7, &Fault::ALL, 2, PACING, 10));
        assert_ne!(first, schedule(8, &Fault::ALL, 2, PACING, 10));
    }

    #[test]
    fn every_fault_comes_once_first_then_random_ones_within_the_pacing() {
        for seed in 0..50 {
            let plan = schedule(seed, &Fault::ALL, 2, PACING, 20);
            assert_eq!(plan.len(), 24);
            let mut first: Vec<Fault> = plan[..4].iter().map(|kill| kill.fault).collect();
            first.sort_unstable();
            assert_eq!(first, Fault::ALL);
            assert!(plan[..4].iter().all(|kill| kill.mandatory) && plan[4..].iter().all(|kill| !kill.mandatory));
            for kill in &plan {
                assert!(kill.wait >= PACING.min_wait && kill.wait <= PACING.max_wait, "{kill:?}");
                assert!(kill.down_for >= PACING.max_down / 10 && kill.down_for <= PACING.max_down, "{kill:?}");
                assert!(kill.gateway < 2);
                if kill.fault != Fault::Gateway {
                    assert_eq!(kill.gateway, 0);
                }
            }
        }
    }

    #[test]
    fn a_subset_of_faults_is_honoured() {
        let plan = schedule(3, &[Fault::Redis, Fault::Redis], 2, PACING, 3);
        assert_eq!(plan.len(), 4);
        assert!(plan.iter().all(|kill| kill.fault == Fault::Redis));
        assert_eq!(plan.iter().filter(|kill| kill.mandatory).count(), 1);
        assert!(schedule(3, &[], 2, PACING, 3).is_empty());
    }

    #[test]
    fn the_generator_spreads_its_draws() {
        let mut rng = Rng::new(42);
        let mut buckets = [0usize; 4];
        for _ in 0..4_000 {
            buckets[rng.below(4)] += 1;
        }
        assert!(buckets.iter().all(|count| (800..1_200).contains(count)), "{buckets:?}");
        let fraction = rng.fraction();
        assert!((0.0..1.0).contains(&fraction));
        assert_ne!(Rng::derive(1, 1).next_u64(), Rng::derive(1, 2).next_u64());
        assert_eq!(Fault::parse("kafka"), Some(Fault::Kafka));
        assert_eq!(Fault::parse("disk"), None);
    }
}
