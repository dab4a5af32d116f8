//! The [`graph!`](crate::graph!) macro.

/// Declares a graph: its state, dependencies, output and events, and for every node its
/// successor enum and where it may go.
///
/// ```
/// use deployd_graph::{graph, Ctx, End, Node, NodeError};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Default, Serialize, Deserialize)]
/// pub struct Count { pub n: u64 }
///
/// #[derive(Serialize, Deserialize)]
/// pub struct Increment;
/// #[derive(Serialize, Deserialize)]
/// pub struct Check { pub target: u64 }
///
/// graph! {
///     /// Counts up to a target.
///     pub Counter {
///         state: Count,
///         deps: (),         // optional, `()` by default
///         output: u64,
///         event: String,    // optional, `()` by default
///         nodes {
///             /// Adds one.
///             Increment => IncrementNext [Check],
///             /// Stops at the target.
///             Check as "check" => CheckNext [Increment "again", End "done"],
///         }
///     }
/// }
/// # impl Node<Counter> for Increment {
/// #     async fn run(self, ctx: Ctx<'_, Counter>) -> Result<IncrementNext, NodeError> {
/// #         ctx.state.n += 1;
/// #         Ok(Check { target: 3 }.into())
/// #     }
/// # }
/// # impl Node<Counter> for Check {
/// #     async fn run(self, ctx: Ctx<'_, Counter>) -> Result<CheckNext, NodeError> {
/// #         Ok(if ctx.state.n < self.target { Increment.into() } else { End(ctx.state.n).into() })
/// #     }
/// # }
/// ```
///
/// This declares the unit struct `Counter` (implementing [`Graph`](crate::Graph)) and, for each
/// node, implements [`NodeDef`](crate::NodeDef) and declares its successor enum
/// (`pub enum CheckNext { Increment(Increment), End(u64) }`) with `From` conversions from each
/// successor, so a node returns `Ok(Increment.into())` or `Ok(End(n).into())`. Returning a node
/// that is not listed does not compile. The node types themselves are yours: structs with named
/// fields or unit structs, `Serialize + Deserialize`, in scope where `graph!` is used.
///
/// - `as "id"` overrides a node's id (its type name by default).
/// - A string after a successor labels the edge in diagrams; `///` comments become notes.
/// - `asks Request => Answer` after the list lets the node interrupt the run: it returns
///   `Ok(CheckNext::Interrupt(request))`, the run waits, and when it is resumed with an answer
///   the node runs again and reads it with `ctx.answer::<Self>()`.
#[macro_export]
macro_rules! graph {
    (
        $(#[doc = $gdoc:literal])*
        $vis:vis $graph:ident {
            state: $state:ty,
            $(deps: $deps:ty,)?
            output: $output:ty,
            $(event: $event:ty,)?
            nodes {
                $(
                    $(#[doc = $doc:literal])*
                    $node:ident $(as $id:literal)? => $next:ident [ $($succ:tt)* ]
                        $(asks $req:ty => $ans:ty)?
                ),* $(,)?
            }
        }
    ) => {
        $(#[doc = $gdoc])*
        #[derive(Debug, Clone, Copy, Default)]
        $vis struct $graph;

        impl $crate::Graph for $graph {
            type State = $state;
            type Deps = $crate::__or_unit!($($deps)?);
            type Output = $output;
            type Event = $crate::__or_unit!($($event)?);
            const NAME: &'static str = stringify!($graph);

            fn spec() -> $crate::GraphSpec {
                $crate::GraphSpec {
                    name: stringify!($graph),
                    nodes: ::std::vec![$(
                        $crate::NodeSpec {
                            id: <$node as $crate::NodeDef<$graph>>::ID,
                            doc: $crate::__private::doc(concat!($($doc, "\n"),*)),
                            edges: <$next as $crate::Successors<$graph>>::edges(),
                            asks: $crate::__asks!($($req)?),
                        }
                    ),*],
                }
            }

            fn decode(
                node_id: &str,
                node: &str,
            ) -> ::std::option::Option<
                ::std::result::Result<$crate::BoxNode<Self>, $crate::__private::JsonError>,
            > {
                $(
                    if node_id == <$node as $crate::NodeDef<$graph>>::ID {
                        return ::std::option::Option::Some(
                            $crate::__private::decode::<$graph, $node>(node),
                        );
                    }
                )*
                let _ = node;
                ::std::option::Option::None
            }

            fn check_answer(
                node_id: &str,
                answer: &str,
            ) -> ::std::option::Option<::std::result::Result<(), $crate::__private::JsonError>> {
                $(
                    if node_id == <$node as $crate::NodeDef<$graph>>::ID {
                        return ::std::option::Option::Some(
                            $crate::__private::check_answer::<$graph, $node>(answer),
                        );
                    }
                )*
                let _ = answer;
                ::std::option::Option::None
            }
        }

        $(
            impl $crate::NodeDef<$graph> for $node {
                const ID: &'static str = $crate::__node_id!($node $($id)?);
                type Next = $next;
                type Answer = $crate::__answer!($($ans)?);
            }

            $crate::__successors!(
                @munch [$vis] $graph $node $next
                [$(Interrupt($req),)?]
                [$($next::Interrupt(request) => $crate::__private::interrupt::<$graph, $req>(&request),)?]
                []
                []
                $($succ)*
            );
        )*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __successors {
    // `End`, optionally labelled.
    (
        @munch [$vis:vis] $graph:ident $node:ident $next:ident
        [$($variants:tt)*] [$($arms:tt)*] [$($edges:tt)*] [$($froms:tt)*]
        End $($label:literal)? $(, $($rest:tt)*)?
    ) => {
        $crate::__successors!(
            @munch [$vis] $graph $node $next
            [$($variants)* End(<$graph as $crate::Graph>::Output),]
            [$($arms)* $next::End(output) => ::std::result::Result::Ok($crate::Step::End(output)),]
            [$($edges)* $crate::EdgeSpec {
                to: $crate::EdgeTarget::End,
                label: $crate::__label!($($label)?),
            },]
            [$($froms)*
                impl ::std::convert::From<$crate::End<<$graph as $crate::Graph>::Output>> for $next {
                    fn from(end: $crate::End<<$graph as $crate::Graph>::Output>) -> Self {
                        $next::End(end.0)
                    }
                }
            ]
            $($($rest)*)?
        );
    };
    // A node, optionally labelled.
    (
        @munch [$vis:vis] $graph:ident $node:ident $next:ident
        [$($variants:tt)*] [$($arms:tt)*] [$($edges:tt)*] [$($froms:tt)*]
        $succ:ident $($label:literal)? $(, $($rest:tt)*)?
    ) => {
        $crate::__successors!(
            @munch [$vis] $graph $node $next
            [$($variants)* $succ($succ),]
            [$($arms)* $next::$succ(node) => ::std::result::Result::Ok(
                $crate::Step::Next(::std::boxed::Box::new(node))
            ),]
            [$($edges)* $crate::EdgeSpec {
                to: $crate::EdgeTarget::Node(<$succ as $crate::NodeDef<$graph>>::ID),
                label: $crate::__label!($($label)?),
            },]
            [$($froms)*
                impl ::std::convert::From<$succ> for $next {
                    fn from(node: $succ) -> Self {
                        $next::$succ(node)
                    }
                }
            ]
            $($($rest)*)?
        );
    };
    // Done: emit the enum and its impls.
    (
        @munch [$vis:vis] $graph:ident $node:ident $next:ident
        [$($variants:tt)*] [$($arms:tt)*] [$($edges:tt)*] [$($froms:tt)*]
    ) => {
        #[doc = concat!("What node `", stringify!($node), "` may lead to.")]
        #[allow(clippy::large_enum_variant)]
        $vis enum $next {
            $($variants)*
        }

        impl $crate::Successors<$graph> for $next {
            fn edges() -> ::std::vec::Vec<$crate::EdgeSpec> {
                ::std::vec![$($edges)*]
            }

            fn into_step(
                self,
            ) -> ::std::result::Result<$crate::Step<$graph>, $crate::NodeError> {
                #[allow(unreachable_code)]
                match self {
                    $($arms)*
                }
            }
        }

        $($froms)*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __or_unit {
    () => {
        ()
    };
    ($ty:ty) => {
        $ty
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __answer {
    () => {
        $crate::NoAnswer
    };
    ($ty:ty) => {
        $ty
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __asks {
    () => {
        false
    };
    ($ty:ty) => {
        true
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __node_id {
    ($node:ident) => {
        stringify!($node)
    };
    ($node:ident $id:literal) => {
        $id
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __label {
    () => {
        ::std::option::Option::None
    };
    ($label:literal) => {
        ::std::option::Option::Some($label)
    };
}
