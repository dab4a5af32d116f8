use deployd_graph::{graph, Ctx, End, Node, NodeError};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Fetch;
#[derive(Serialize, Deserialize)]
struct Parse;
#[derive(Serialize, Deserialize)]
struct Store;

graph! {
    Pipeline {
        state: (),
        output: u32,
        nodes {
            Fetch => FetchNext [Parse],
            Parse => ParseNext [Store],
            Store => StoreNext [End],
        }
    }
}

impl Node<Pipeline> for Fetch {
    async fn run(self, _ctx: Ctx<'_, Pipeline>) -> Result<FetchNext, NodeError> {
        // `Fetch` may only go to `Parse`.
        Ok(Store.into())
    }
}

impl Node<Pipeline> for Parse {
    async fn run(self, _ctx: Ctx<'_, Pipeline>) -> Result<ParseNext, NodeError> {
        // `Parse` does not declare `End`.
        Ok(End(1).into())
    }
}

impl Node<Pipeline> for Store {
    async fn run(self, _ctx: Ctx<'_, Pipeline>) -> Result<StoreNext, NodeError> {
        Ok(End(1).into())
    }
}

fn main() {}
