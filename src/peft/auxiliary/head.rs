//! `lm_head` with PEFT's auxiliary modules: its base layer (as the method built it), with the
//! output columns of trained token rows replaced (PEFT's `TrainableTokensLayer` over a Linear:
//! `F.linear(x, W.index_copy(0, ids, rows))`), or a whole trained copy. Never prints.

use std::sync::{Arc, OnceLock};

use candle_core::{bail, Tensor};

use super::rows::TrainedRows;
use super::State;
use crate::models::LinearLayer;
use crate::peft::{live, Training};

/// The module path of the output projection.
pub const HEAD_PATH: &str = "lm_head";

/// What `lm_head` uses.
pub enum HeadRows {
    /// The base layer as built.
    Base,
    /// Tied to the embedding's trained rows (resolved to [`HeadRows::Tied`] once they exist).
    Follows,
    /// The embedding's trained rows (a tied head; saved with the embedding, PEFT's
    /// `tied_adapter`).
    Tied(Arc<TrainedRows>),
    /// Its own trained rows or whole copy.
    Own(Arc<TrainedRows>),
}

impl HeadRows {
    /// Rows saved and trained under `lm_head`'s own name.
    pub fn own(&self) -> Option<&Arc<TrainedRows>> {
        match self {
            HeadRows::Own(rows) => Some(rows),
            _ => None,
        }
    }
}

/// The output projection wrapped for auxiliary rows (decided once the model is built).
pub struct AuxiliaryHead {
    inner: Box<dyn LinearLayer>,
    state: Arc<OnceLock<State>>,
    training: Arc<Training>,
}

impl AuxiliaryHead {
    pub fn new(
        inner: Box<dyn LinearLayer>,
        state: Arc<OnceLock<State>>,
        training: Arc<Training>,
    ) -> Self {
        AuxiliaryHead {
            inner,
            state,
            training,
        }
    }
}

impl LinearLayer for AuxiliaryHead {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Some(state) = self.state.get() else {
            bail!("lm_head's auxiliary rows are used before the adapter was attached (finish_injection)")
        };
        let rows = match &state.head {
            HeadRows::Base | HeadRows::Follows => return self.inner.forward(x),
            HeadRows::Tied(rows) | HeadRows::Own(rows) => rows,
        };
        let weight = live(rows.var(), self.training.get()).to_dtype(x.dtype())?;
        let dims = x.dims().to_vec();
        let hidden = *dims.last().unwrap_or(&0);
        let positions = x.elem_count() / hidden.max(1);
        let flat = x.reshape((positions, hidden))?;
        let Some(slots) = rows.slots() else {
            // A whole trained copy: y = x·Wᵀ, the gradient reaching W and x.
            let vocab = weight.dim(0)?;
            let mut out = dims;
            if let Some(last) = out.last_mut() {
                *last = vocab;
            }
            return crate::ops::matmul_tracked(&flat, &weight.t()?)?.reshape(out);
        };
        // The trained tokens' columns of x·Wᵀ become x·rowsᵀ: the base output plus
        // x·(rows − base rows)ᵀ scattered into those columns (exactly the base at step 0).
        let Some(base_rows) = rows.base_rows() else {
            bail!("lm_head's token rows have no base rows")
        };
        // `*_tracked`: the base rows, a frozen input and the zero column get no stored gradient.
        let delta = crate::ops::sub_constant(&weight, &base_rows.to_dtype(x.dtype())?)?;
        let base = self.inner.forward(x)?;
        let columns = crate::ops::matmul_tracked(&flat, &delta.t()?)?;
        let zero = Tensor::zeros((positions, 1), columns.dtype(), columns.device())?;
        let scattered = crate::ops::cat_tracked(&[&zero, &columns], 1)?.index_select(slots, 1)?;
        crate::ops::add_tracked(&base, &scattered.reshape(base.shape())?)
    }

    fn frozen_weight(&self) -> Option<&Tensor> {
        match self.state.get()?.head {
            HeadRows::Base => self.inner.frozen_weight(),
            _ => None,
        }
    }
}
