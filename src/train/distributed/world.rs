//! The world of a data-parallel run, read from the torchrun variables (see the module docs of
//! [`super`]).

/// This process's place in the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    pub world_size: usize,
    /// Rank on this host: the CUDA device ordinal (after `CUDA_VISIBLE_DEVICES`).
    pub local_rank: usize,
    /// Which host this is (0 on a single host).
    pub node_rank: usize,
    /// Where rank 0 listens for the rendezvous (`None` in a world of one).
    pub master: Option<(String, u16)>,
}

/// A torchrun variable that is missing or wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorldError {
    #[error(
        "environment variable {name} is not set, but {set} is: a distributed run needs all of \
         RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (torchrun sets them)"
    )]
    Missing {
        name: &'static str,
        set: &'static str,
    },
    #[error("environment variable {name}={value:?} is not {expected}")]
    Invalid {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("environment variable RANK={rank} is not below WORLD_SIZE={world_size}")]
    RankOutOfRange { rank: usize, world_size: usize },
    #[error("environment variable LOCAL_RANK={local_rank} is not below WORLD_SIZE={world_size}")]
    LocalRankOutOfRange {
        local_rank: usize,
        world_size: usize,
    },
}

const REQUIRED: [&str; 5] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
];

impl World {
    /// The world of one (single-GPU training).
    pub fn single() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            node_rank: 0,
            master: None,
        }
    }

    /// Read the world from the process environment.
    pub fn from_env() -> Result<Self, WorldError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// The world an outside launcher started this process in (`peftpipe run` under torchrun): a
    /// world of one unless `WORLD_SIZE` is set — other torchrun variables alone, such as a
    /// `MASTER_PORT` left in a shell, are not a launch — and with it as [`World::from_env`].
    pub fn from_launcher_env() -> Result<Self, WorldError> {
        Self::from_launcher_lookup(|name| std::env::var(name).ok())
    }

    /// [`World::from_launcher_env`] through `lookup`.
    pub fn from_launcher_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, WorldError> {
        if lookup("WORLD_SIZE").is_none() {
            return Ok(Self::single());
        }
        Self::from_lookup(lookup)
    }

    /// Read the world through `lookup` (the environment, or a map in tests). None of the required
    /// variables set is a world of one; `WORLD_SIZE=1` alone is one too.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, WorldError> {
        let values: Vec<Option<String>> = REQUIRED.iter().map(|name| lookup(name)).collect();
        let set = REQUIRED
            .iter()
            .zip(&values)
            .find(|(_, value)| value.is_some())
            .map(|(name, _)| *name);
        let Some(set) = set else {
            return Ok(Self::single());
        };
        let world_size_only = values
            .iter()
            .enumerate()
            .all(|(i, value)| value.is_none() || REQUIRED[i] == "WORLD_SIZE");
        if world_size_only && values[1].as_deref().map(str::trim) == Some("1") {
            return Ok(Self::single());
        }
        for (name, value) in REQUIRED.iter().zip(&values) {
            if value.is_none() {
                return Err(WorldError::Missing { name, set });
            }
        }
        let count = |name: &'static str, value: &str| {
            value
                .trim()
                .parse::<usize>()
                .map_err(|_| WorldError::Invalid {
                    name,
                    value: value.to_string(),
                    expected: "a non-negative integer",
                })
        };
        let value = |i: usize| values[i].as_deref().unwrap_or_default();
        let rank = count("RANK", value(0))?;
        let world_size = count("WORLD_SIZE", value(1))?;
        if world_size == 0 {
            return Err(WorldError::Invalid {
                name: "WORLD_SIZE",
                value: value(1).to_string(),
                expected: "a positive integer",
            });
        }
        let local_rank = count("LOCAL_RANK", value(2))?;
        let address = value(3).trim().to_string();
        if address.is_empty() {
            return Err(WorldError::Invalid {
                name: "MASTER_ADDR",
                value: value(3).to_string(),
                expected: "a host name or IP address",
            });
        }
        let port = value(4)
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| WorldError::Invalid {
                name: "MASTER_PORT",
                value: value(4).to_string(),
                expected: "a port number (1-65535)",
            })?;
        let node_rank = match lookup("NODE_RANK") {
            Some(value) => count("NODE_RANK", &value)?,
            None => 0,
        };
        if rank >= world_size {
            return Err(WorldError::RankOutOfRange { rank, world_size });
        }
        if local_rank >= world_size {
            return Err(WorldError::LocalRankOutOfRange {
                local_rank,
                world_size,
            });
        }
        Ok(Self {
            rank,
            world_size,
            local_rank,
            node_rank,
            master: Some((address, port)),
        })
    }

    /// Rank 0 writes artifacts (adapter, checkpoints, cache entries); the others only train.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}
