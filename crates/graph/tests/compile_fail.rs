//! The successors a node may return are part of its type: returning another node, or the end
//! when the end is not declared, does not compile.

#[test]
fn undeclared_successors_do_not_compile() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
