//! Rows into Rust values: [`FromRow`], and the `query_as` family on read
//! clients and writers.

use tokio_postgres::types::FromSql;
use tokio_postgres::Row;

/// A value built from one row, as `sqlx::FromRow` does, for
/// [`TenantClient::query_as`](crate::TenantClient::query_as) and
/// [`TenantWriter::query_as`](crate::TenantWriter::query_as). Implemented for
/// tuples of up to eight columns (by position); implement it for your structs
/// with [`Row::try_get`] by name. A column that is missing or of another type
/// fails the query with [`DbError::Query`](crate::DbError::Query), naming it.
///
/// ```
/// use shard_router::tokio_postgres::{Error, Row};
/// use shard_router::FromRow;
///
/// struct Note {
///     id: uuid::Uuid,
///     body: String,
/// }
///
/// impl FromRow for Note {
///     fn from_row(row: &Row) -> Result<Self, Error> {
///         Ok(Note { id: row.try_get("id")?, body: row.try_get("body")? })
///     }
/// }
/// ```
pub trait FromRow: Sized {
    /// Builds the value from `row`.
    fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error>;
}

macro_rules! tuple_from_row {
    ($($t:ident $i:tt),+) => {
        impl<$($t),+> FromRow for ($($t,)+)
        where
            $($t: for<'a> FromSql<'a>),+
        {
            fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error> {
                Ok(($(row.try_get::<_, $t>($i)?,)+))
            }
        }
    };
}

tuple_from_row!(A 0);
tuple_from_row!(A 0, B 1);
tuple_from_row!(A 0, B 1, C 2);
tuple_from_row!(A 0, B 1, C 2, D 3);
tuple_from_row!(A 0, B 1, C 2, D 3, E 4);
tuple_from_row!(A 0, B 1, C 2, D 3, E 4, F 5);
tuple_from_row!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);
tuple_from_row!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);

/// Every row as a `T`.
pub(super) fn all<T: FromRow>(rows: &[Row]) -> Result<Vec<T>, tokio_postgres::Error> {
    rows.iter().map(T::from_row).collect()
}
