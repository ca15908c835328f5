//! SQL policy cost per statement: classification (lexer pass + sqlparser AST) of a short SELECT and of a ~2 KB
//! ORM query with a cold cache (every lookup a miss) and a warm one (a hit), and the rule check on cached facts.
//!
//! `cargo bench --bench policy` (add `-- --quick` for a fast run).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use pgweir::policy::{classify, Classifier, Context, PolicyConfig};

const SHORT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";

/// A query of the shape ORMs generate: joins, quoted identifiers, many parameters, about 2 KB.
fn orm_query() -> String {
    let mut cols = Vec::new();
    for t in ["u", "o", "p"] {
        for c in [
            "id",
            "created_at",
            "updated_at",
            "name",
            "status",
            "owner_id",
            "amount",
        ] {
            cols.push(format!("\"{t}\".\"{c}\" AS \"{t}_{c}\""));
        }
    }
    let mut sql = format!(
        "SELECT {} FROM \"users\" AS \"u\" LEFT OUTER JOIN \"orders\" AS \"o\" ON \"o\".\"user_id\" = \"u\".\"id\" \
         LEFT OUTER JOIN \"products\" AS \"p\" ON \"p\".\"id\" = \"o\".\"product_id\" WHERE (\"u\".\"status\" IN ($1, $2, $3) \
         AND \"o\".\"created_at\" >= $4 AND \"o\".\"amount\" > $5 AND (\"p\".\"name\" ILIKE $6 OR \"p\".\"name\" ILIKE $7)) \
         AND EXISTS (SELECT 1 FROM \"payments\" AS \"pay\" WHERE \"pay\".\"order_id\" = \"o\".\"id\" AND \"pay\".\"state\" = $8) ",
        cols.join(", ")
    );
    sql.push_str("ORDER BY \"o\".\"created_at\" DESC, \"u\".\"id\" ASC LIMIT $9 OFFSET $10");
    while sql.len() < 2000 {
        sql.push_str(" /* padding comment of the ORM */");
    }
    sql
}

fn bench(c: &mut Criterion) {
    let orm = orm_query();
    let policy = PolicyConfig::default();
    let ctx = Context {
        database: "tenant_a",
        read_only: None,
    };
    let mut g = c.benchmark_group("classify");
    for (name, sql) in [("short_select", SHORT), ("orm_2kb", orm.as_str())] {
        g.bench_function(format!("{name}/cold"), |b| {
            b.iter(|| black_box(classify::analyze(black_box(sql))))
        });
        let cache = Classifier::default();
        cache.facts(sql.as_bytes());
        g.bench_function(format!("{name}/warm"), |b| {
            b.iter(|| {
                let facts = cache.facts(black_box(sql.as_bytes()));
                black_box(policy.check(&facts, &ctx))
            })
        });
    }
    // Simple-protocol traffic: the same query with a new literal each time (pgbench -S without -M).
    let cache = Classifier::default();
    let mut n = 0u64;
    g.bench_function("short_select/literal_variants", |b| {
        b.iter(|| {
            n += 1;
            let sql = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {n};");
            let facts = cache.facts(black_box(sql.as_bytes()));
            black_box(policy.check(&facts, &ctx))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
