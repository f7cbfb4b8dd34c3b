package eventrouter.bench.camel;

import com.fasterxml.jackson.core.JsonProcessingException;
import java.util.List;
import java.util.Map;
import org.apache.camel.Exchange;
import org.apache.camel.builder.RouteBuilder;
import org.apache.camel.component.jackson.JacksonDataFormat;
import org.apache.camel.model.dataformat.JsonLibrary;
import org.apache.camel.support.processor.PredicateValidationException;

/**
 * Route from {@code POST /v2/events} to one Kafka record per event.
 *
 * <p>The request body is {@code {"events": [...]}}. The splitter sends each
 * event to Kafka as one record, and each send completes only after Kafka has
 * acknowledged the record. The splitter continues after the last send has
 * completed, so the 200 response means that every event of the request is on
 * the topic. The record value is the event's compact JSON, with no key and no
 * record headers.
 *
 * <p>The route has two modes, with the same producer settings and the same
 * acknowledgement semantics:
 * <ul>
 *   <li>sequential (the default): the splitter sends the events one after
 *       the other, each after the previous one was acknowledged.
 *   <li>parallel: the splitter runs with {@code .parallelProcessing()} and
 *       sends a request's events concurrently from Camel's default thread
 *       pool (profile {@code defaultThreadPoolProfile} in Camel 4.22: 10 core
 *       threads, at most 20, a queue of 1,000 tasks, and the caller runs a
 *       task that the full pool rejects).
 * </ul>
 *
 * <p>NOTE: camel-platform-http-vertx 4.22 runs each request on a thread of
 * the Vert.x worker pool and blocks that thread until the exchange completes.
 * The pool has 20 threads by default, so at most 20 requests are in progress
 * at once, and the others wait in the pool's queue. In the sequential mode
 * each of the 20 sends one record at a time, so the rate is bound by latency,
 * not CPU. In one trial on a 2-CPU KVM guest (5 s wrk runs after 35 s of
 * load) the parallel mode raised the rate from about 3,000 to about 45,000
 * events/s, with the JVM's CPU near 100%.
 *
 * <p>Reads the property placeholders {@code kafka.bootstrap} and
 * {@code kafka.topic}.
 */
public final class EventsToKafkaRoute extends RouteBuilder {

    /**
     * The Kafka endpoint. acks, idempotence and linger are camel-kafka 4.22's
     * defaults as well, and are spelled out because the benchmark requires
     * these three values from every candidate.
     */
    static final String KAFKA_URI = "kafka:{{kafka.topic}}"
            + "?brokers={{kafka.bootstrap}}"
            + "&requestRequiredAcks=all"
            + "&enableIdempotence=true"
            + "&lingerMs=5"
            + "&valueSerializer=org.apache.kafka.common.serialization.ByteArraySerializer";

    private final boolean parallel;

    /**
     * Creates the route.
     *
     * @param parallel whether the splitter sends a request's events
     *     concurrently ({@code .parallelProcessing()}) instead of one after the
     *     other
     */
    public EventsToKafkaRoute(boolean parallel) {
        this.parallel = parallel;
    }

    @Override
    public void configure() {
        // Without this setting the data format sets a Content-Type header,
        // which the Kafka producer would copy into every record.
        JacksonDataFormat eventJson = new JacksonDataFormat();
        eventJson.setContentTypeHeader(false);

        onException(JsonProcessingException.class, PredicateValidationException.class)
                .handled(true)
                .removeHeaders("*")
                .setHeader(Exchange.HTTP_RESPONSE_CODE, constant(400))
                .setHeader(Exchange.CONTENT_TYPE, constant("application/json"))
                .setBody(constant("{\"error\":\"the body is not a JSON object with an events array\"}"));

        from("platform-http:/v2/events?httpMethodRestrict=POST")
                .routeId("events-to-kafka")
                .unmarshal().json(JsonLibrary.Jackson, Map.class)
                .validate().body(Map.class, batch -> batch.get("events") instanceof List)
                // HTTP request headers are not event data, so they must not
                // become Kafka record headers.
                .removeHeaders("*")
                .split().body(Map.class, batch -> batch.get("events"))
                    .parallelProcessing(parallel)
                    .marshal(eventJson)
                    .to(KAFKA_URI)
                .end()
                .setHeader(Exchange.CONTENT_TYPE, constant("application/json"))
                .setBody(constant("{}"));
    }
}
