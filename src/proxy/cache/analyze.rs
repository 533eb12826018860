//! What a statement reads and calls, from PostgreSQL's own parser (`pg_query`), before the
//! server's catalog is asked about any of it ([`super::catalog`]).
//!
//! The walk is closed: every node type it meets is either understood (its children walked) or
//! the statement is refused, naming the construct. A walker that skipped what it did not know
//! (pg_query's own `nodes()` does not descend into `ARRAY[...]` or window definitions, say)
//! could miss a `random()` and cache a volatile answer; this one cannot.

use std::collections::BTreeSet;

use pg_query::protobuf::{self, node::Node as N, AExprKind, Node};

/// A relation as the statement names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RelationName {
    /// Empty when unqualified: resolved through the client's `search_path`.
    pub schema: String,
    pub name: String,
}

/// What a single `SELECT` reads and calls: the input of the catalog checks.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Shape {
    pub relations: BTreeSet<RelationName>,
    /// Function names (unqualified: every overload of each is checked).
    pub functions: BTreeSet<String>,
    pub operators: BTreeSet<String>,
}

/// Why a statement is not cacheable, as an operator reads it.
pub type Refusal = String;

/// Parses `sql` and walks it. `standard_conforming_strings` is the client's setting (it
/// changes how the statement's string literals parse).
pub fn analyze(sql: &str, standard_conforming_strings: bool) -> Result<Shape, Refusal> {
    let options = if standard_conforming_strings {
        pg_query::ParserOptions::DEFAULT
    } else {
        pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS
    };
    let parsed = pg_query::parse(sql, options).map_err(|e| format!("does not parse: {e}"))?;
    let [statement] = parsed.protobuf.stmts.as_slice() else {
        return Err(format!(
            "{} statements in one query (only a single SELECT is cached)",
            parsed.protobuf.stmts.len()
        ));
    };
    let Some(N::SelectStmt(select)) = statement.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
        return Err("not a SELECT".into());
    };
    let mut walk = Walk::default();
    walk.select(select, &[])?;
    Ok(walk.shape)
}

#[derive(Default)]
struct Walk {
    shape: Shape,
}

/// Common table expression names visible where a relation is named.
type Scope<'a> = [&'a str];

impl Walk {
    fn select(&mut self, s: &protobuf::SelectStmt, outer: &Scope) -> Result<(), Refusal> {
        if s.into_clause.is_some() {
            return Err("SELECT INTO writes a table".into());
        }
        if !s.locking_clause.is_empty() {
            return Err("has a locking clause (FOR UPDATE/SHARE)".into());
        }
        let mut scope: Vec<&str> = outer.to_vec();
        if let Some(with) = &s.with_clause {
            if with.recursive {
                for cte in &with.ctes {
                    if let Some(N::CommonTableExpr(cte)) = &cte.node {
                        scope.push(&cte.ctename);
                    }
                }
            }
            for cte in &with.ctes {
                let Some(N::CommonTableExpr(cte)) = &cte.node else {
                    return Err("an unexpected WITH item".into());
                };
                match cte.ctequery.as_deref().and_then(|q| q.node.as_ref()) {
                    Some(N::SelectStmt(query)) => self.select(query, &scope)?,
                    _ => return Err(format!("WITH {} is not a SELECT", cte.ctename)),
                }
                if !with.recursive {
                    scope.push(&cte.ctename);
                }
            }
        }
        if let Some(larg) = &s.larg {
            self.select(larg, &scope)?;
        }
        if let Some(rarg) = &s.rarg {
            self.select(rarg, &scope)?;
        }
        for list in [
            &s.distinct_clause,
            &s.target_list,
            &s.from_clause,
            &s.group_clause,
            &s.window_clause,
            &s.values_lists,
            &s.sort_clause,
        ] {
            self.nodes(list, &scope)?;
        }
        for one in [
            &s.where_clause,
            &s.having_clause,
            &s.limit_offset,
            &s.limit_count,
        ] {
            self.maybe(one.as_deref(), &scope)?;
        }
        Ok(())
    }

    fn nodes(&mut self, nodes: &[Node], scope: &Scope) -> Result<(), Refusal> {
        nodes.iter().try_for_each(|n| self.node(n, scope))
    }

    fn maybe(&mut self, node: Option<&Node>, scope: &Scope) -> Result<(), Refusal> {
        node.map_or(Ok(()), |n| self.node(n, scope))
    }

    fn node(&mut self, node: &Node, scope: &Scope) -> Result<(), Refusal> {
        let Some(node) = &node.node else {
            return Ok(());
        };
        match node {
            N::SelectStmt(s) => self.select(s, scope),
            N::RangeVar(r) => {
                if !r.catalogname.is_empty() {
                    return Err(format!("names a database ({})", r.catalogname));
                }
                // A common table expression of that name in scope is not a relation.
                if r.schemaname.is_empty() && scope.contains(&r.relname.as_str()) {
                    return Ok(());
                }
                self.shape.relations.insert(RelationName {
                    schema: r.schemaname.clone(),
                    name: r.relname.clone(),
                });
                Ok(())
            }
            N::JoinExpr(j) => {
                self.maybe(j.larg.as_deref(), scope)?;
                self.maybe(j.rarg.as_deref(), scope)?;
                self.maybe(j.quals.as_deref(), scope)
            }
            N::RangeSubselect(r) => self.maybe(r.subquery.as_deref(), scope),
            N::RangeFunction(r) => {
                // Each item is a List of the function call and its column definitions.
                self.nodes(&r.functions, scope)
            }
            N::ResTarget(t) => {
                self.nodes(&t.indirection, scope)?;
                self.maybe(t.val.as_deref(), scope)
            }
            N::ColumnRef(_) | N::ParamRef(_) | N::AStar(_) | N::Integer(_) | N::Float(_) => Ok(()),
            N::String(_) | N::Boolean(_) | N::BitString(_) | N::Alias(_) => Ok(()),
            N::AConst(c) => match &c.val {
                Some(protobuf::a_const::Val::Sval(s)) => time_literal(&s.sval),
                _ => Ok(()),
            },
            N::TypeCast(c) => {
                // The type's input function runs on the literal; 'now'-style literals are
                // refused where the literal is seen.
                self.maybe(c.arg.as_deref(), scope)
            }
            N::AExpr(e) => {
                self.operator(e)?;
                self.maybe(e.lexpr.as_deref(), scope)?;
                self.maybe(e.rexpr.as_deref(), scope)
            }
            N::BoolExpr(e) => self.nodes(&e.args, scope),
            N::NullTest(e) => self.maybe(e.arg.as_deref(), scope),
            N::BooleanTest(e) => self.maybe(e.arg.as_deref(), scope),
            N::CaseExpr(e) => {
                self.maybe(e.arg.as_deref(), scope)?;
                self.nodes(&e.args, scope)?;
                self.maybe(e.defresult.as_deref(), scope)
            }
            N::CaseWhen(w) => {
                self.maybe(w.expr.as_deref(), scope)?;
                self.maybe(w.result.as_deref(), scope)
            }
            N::CoalesceExpr(e) => self.nodes(&e.args, scope),
            N::MinMaxExpr(e) => self.nodes(&e.args, scope),
            N::RowExpr(e) => self.nodes(&e.args, scope),
            N::AArrayExpr(e) => self.nodes(&e.elements, scope),
            N::AIndirection(e) => {
                self.maybe(e.arg.as_deref(), scope)?;
                self.nodes(&e.indirection, scope)
            }
            N::AIndices(i) => {
                self.maybe(i.lidx.as_deref(), scope)?;
                self.maybe(i.uidx.as_deref(), scope)
            }
            N::CollateClause(c) => self.maybe(c.arg.as_deref(), scope),
            N::List(l) => self.nodes(&l.items, scope),
            N::SortBy(s) => {
                for op in names(&s.use_op) {
                    self.shape.operators.insert(op);
                }
                self.maybe(s.node.as_deref(), scope)
            }
            N::GroupingSet(g) => self.nodes(&g.content, scope),
            N::WindowDef(w) => self.window(w, scope),
            N::SubLink(l) => {
                for op in names(&l.oper_name) {
                    self.shape.operators.insert(op);
                }
                self.maybe(l.testexpr.as_deref(), scope)?;
                self.maybe(l.subselect.as_deref(), scope)
            }
            N::FuncCall(f) => {
                let Some(name) = names(&f.funcname).last().cloned() else {
                    return Err("a function call without a name".into());
                };
                self.shape.functions.insert(name);
                self.nodes(&f.args, scope)?;
                self.nodes(&f.agg_order, scope)?;
                self.maybe(f.agg_filter.as_deref(), scope)?;
                if let Some(over) = &f.over {
                    self.window(over, scope)?;
                }
                Ok(())
            }
            N::SqlvalueFunction(f) => Err(format!("calls {}", sql_value_function(f.op))),
            other => Err(format!(
                "uses {}, which the cache does not analyse",
                kind(other)
            )),
        }
    }

    fn window(&mut self, w: &protobuf::WindowDef, scope: &Scope) -> Result<(), Refusal> {
        self.nodes(&w.partition_clause, scope)?;
        self.nodes(&w.order_clause, scope)?;
        self.maybe(w.start_offset.as_deref(), scope)?;
        self.maybe(w.end_offset.as_deref(), scope)
    }

    /// Notes the operators an expression applies (BETWEEN and IN are written with the
    /// comparison operators they become).
    fn operator(&mut self, e: &protobuf::AExpr) -> Result<(), Refusal> {
        let kind = AExprKind::try_from(e.kind).unwrap_or(AExprKind::Undefined);
        let named = names(&e.name);
        match kind {
            AExprKind::AexprBetween
            | AExprKind::AexprNotBetween
            | AExprKind::AexprBetweenSym
            | AExprKind::AexprNotBetweenSym => {
                self.shape.operators.insert(">=".into());
                self.shape.operators.insert("<=".into());
            }
            AExprKind::AexprSimilar => {
                // SIMILAR TO runs similar_to_escape() and then `~`.
                self.shape.functions.insert("similar_to_escape".into());
                self.shape.operators.extend(named);
            }
            AExprKind::Undefined => return Err("an expression the parser did not classify".into()),
            _ => self.shape.operators.extend(named),
        }
        Ok(())
    }
}

/// The strings of a name list (`pg_catalog.lower` → `["pg_catalog", "lower"]`).
fn names(list: &[Node]) -> Vec<String> {
    list.iter()
        .filter_map(|n| match &n.node {
            Some(N::String(s)) => Some(s.sval.clone()),
            _ => None,
        })
        .collect()
}

/// Date/time input strings whose value depends on when they are read.
fn time_literal(text: &str) -> Result<(), Refusal> {
    let word = text.trim().to_ascii_lowercase();
    if matches!(word.as_str(), "now" | "today" | "tomorrow" | "yesterday") {
        return Err(format!(
            "has the literal '{word}', whose value depends on the time"
        ));
    }
    Ok(())
}

fn sql_value_function(op: i32) -> &'static str {
    use protobuf::SqlValueFunctionOp as Op;
    match Op::try_from(op) {
        Ok(Op::SvfopCurrentDate) => "CURRENT_DATE",
        Ok(Op::SvfopCurrentTime | Op::SvfopCurrentTimeN) => "CURRENT_TIME",
        Ok(Op::SvfopCurrentTimestamp | Op::SvfopCurrentTimestampN) => "CURRENT_TIMESTAMP",
        Ok(Op::SvfopLocaltime | Op::SvfopLocaltimeN) => "LOCALTIME",
        Ok(Op::SvfopLocaltimestamp | Op::SvfopLocaltimestampN) => "LOCALTIMESTAMP",
        Ok(Op::SvfopCurrentRole) => "CURRENT_ROLE",
        Ok(Op::SvfopCurrentUser) => "CURRENT_USER",
        Ok(Op::SvfopUser) => "USER",
        Ok(Op::SvfopSessionUser) => "SESSION_USER",
        Ok(Op::SvfopCurrentCatalog) => "CURRENT_CATALOG",
        Ok(Op::SvfopCurrentSchema) => "CURRENT_SCHEMA",
        _ => "an SQL value function",
    }
}

/// The name of a node type, for a refusal.
fn kind(node: &N) -> String {
    let debug = format!("{node:?}");
    debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("a construct")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(sql: &str) -> Shape {
        analyze(sql, true).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    fn refused(sql: &str) -> String {
        match analyze(sql, true) {
            Ok(shape) => panic!("{sql} was accepted: {shape:?}"),
            Err(reason) => reason,
        }
    }

    fn rel(schema: &str, name: &str) -> RelationName {
        RelationName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    #[test]
    fn a_join_with_an_aggregate_reads_its_tables_and_calls_its_functions() {
        let s = shape(
            "SELECT c.name, sum(i.qty * i.price) FROM sales.orders o \
             JOIN customers c ON c.id = o.customer_id \
             JOIN order_items i USING (order_id) WHERE o.id BETWEEN $1 AND $2 \
             GROUP BY c.name ORDER BY 2 DESC LIMIT 10",
        );
        assert_eq!(
            s.relations.into_iter().collect::<Vec<_>>(),
            vec![
                rel("", "customers"),
                rel("", "order_items"),
                rel("sales", "orders")
            ]
        );
        assert_eq!(s.functions.into_iter().collect::<Vec<_>>(), vec!["sum"]);
        assert!(s.operators.contains("=") && s.operators.contains("*"));
        assert!(s.operators.contains(">=") && s.operators.contains("<="));
    }

    #[test]
    fn time_dependent_and_locking_reads_are_refused() {
        assert!(shape("SELECT now()").functions.contains("now"));
        assert!(refused("SELECT current_timestamp").contains("CURRENT_TIMESTAMP"));
        assert!(refused("SELECT * FROM t WHERE d > current_date").contains("CURRENT_DATE"));
        assert!(refused("SELECT 'now'::timestamptz").contains("'now'"));
        assert!(refused("SELECT * FROM t WHERE d = ' Today '::date").contains("'today'"));
        assert!(refused("SELECT * FROM t FOR UPDATE").contains("locking"));
        assert!(refused("SELECT * FROM t FOR SHARE SKIP LOCKED").contains("locking"));
        assert!(refused("SELECT current_user").contains("CURRENT_USER"));
    }

    #[test]
    fn only_one_select_is_cacheable() {
        assert!(refused("SELECT 1; SELECT 2").contains("2 statements"));
        assert_eq!(refused("UPDATE t SET a = 1"), "not a SELECT");
        assert_eq!(refused("BEGIN"), "not a SELECT");
        assert!(refused("SELECT * INTO new_t FROM t").contains("INTO"));
        assert!(
            refused("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d")
                .contains("not a SELECT")
        );
        assert!(refused("SELEC 1").contains("does not parse"));
    }

    #[test]
    fn functions_hidden_in_arrays_windows_and_subqueries_are_found() {
        let s = shape("SELECT ARRAY[random()], x FROM t");
        assert!(s.functions.contains("random"));
        let s = shape("SELECT row_number() OVER (ORDER BY random()) FROM t");
        assert!(s.functions.contains("random") && s.functions.contains("row_number"));
        let s = shape("SELECT * FROM t WHERE a IN (SELECT nextval('s'))");
        assert!(s.functions.contains("nextval"));
        let s = shape("SELECT (x).f[gen()] FROM t");
        assert!(s.functions.contains("gen"));
        let s = shape("SELECT * FROM generate_series(1, 3) g");
        assert!(s.functions.contains("generate_series"));
        let s = shape("SELECT count(*) FILTER (WHERE clock_timestamp() > x) FROM t");
        assert!(s.functions.contains("clock_timestamp"));
    }

    #[test]
    fn common_table_expressions_are_not_relations_where_they_are_in_scope() {
        let s = shape("WITH t AS (SELECT * FROM base) SELECT * FROM t");
        assert_eq!(
            s.relations.into_iter().collect::<Vec<_>>(),
            vec![rel("", "base")]
        );
        // The outer `t` is a table: the CTE of that name is only visible inside.
        let s = shape("SELECT * FROM t, (WITH t AS (SELECT 1) SELECT * FROM t) s");
        assert_eq!(
            s.relations.into_iter().collect::<Vec<_>>(),
            vec![rel("", "t")]
        );
        let s = shape(
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) \
             SELECT * FROM r",
        );
        assert!(s.relations.is_empty());
        // A schema-qualified name is never a CTE.
        let s = shape("WITH t AS (SELECT 1) SELECT * FROM public.t");
        assert_eq!(
            s.relations.into_iter().collect::<Vec<_>>(),
            vec![rel("public", "t")]
        );
    }

    #[test]
    fn constructs_the_walk_does_not_know_are_refused() {
        assert!(refused("SELECT xmlelement(name a, 'x')").contains("does not analyse"));
        assert!(refused("SELECT * FROM t TABLESAMPLE SYSTEM (10)").contains("does not analyse"));
    }
}
